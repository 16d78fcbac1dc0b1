"""Per-exit adapters: a small residual map on an exit's hidden state before the shared head.

The model's own final norm + LM head read intermediate layers poorly (on SmolLM2-135M the
head's top token after layer 28 of 30 matches the last layer's only about half the time), so
each exit may carry an adapter ``h -> h + A h + b`` (or a rank-``r`` ``A``), trained with the
base model frozen to make the exit's next-token distribution match the last layer's:

1. a closed-form start: ridge regression of the last layer's hidden state on the exit's
   (the tuned-lens idea, Belrose et al. 2023), cheap enough to use every recorded token;
2. distillation: KL(last layer || exit) on next-token distributions, by Adam, over a
   candidate vocabulary per batch (the teacher's top tokens plus a random sample), which keeps
   each step affordable on a CPU while the normaliser still sees most of the mass.

Files are safetensors with the exit depths, rank and model fingerprint in the metadata; the
file's SHA-256 names the adapters a thresholds file was calibrated with.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wattserve.errors import ExitCalibrationError

FORMAT = "wattserve-exit-adapters/1"


class ExitAdapter(torch.nn.Module):
    """``h + A h + b`` with ``A`` full (rank None) or ``U V`` of rank ``rank``; starts as identity."""

    def __init__(self, hidden: int, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank
        if rank:
            self.down = torch.nn.Linear(hidden, rank, bias=False)
            self.up = torch.nn.Linear(rank, hidden)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)
        else:
            self.lin = torch.nn.Linear(hidden, hidden)
            torch.nn.init.zeros_(self.lin.weight)
            torch.nn.init.zeros_(self.lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (self.up(self.down(h)) if self.rank else self.lin(h))

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set ``A`` (``(hidden, hidden)``, applied as ``h @ weight``) and ``b``; a rank-``r``
        adapter keeps the top-``r`` right singular directions of ``weight``."""
        if not self.rank:
            self.lin.weight.copy_(weight.T)
            self.lin.bias.copy_(bias)
            return
        _, _, vh = torch.linalg.svd(weight, full_matrices=False)
        basis = vh[: self.rank].T  # (hidden, r): output directions kept
        self.down.weight.copy_((weight @ basis).T)
        self.up.weight.copy_(basis)
        self.up.bias.copy_(bias @ basis @ basis.T)


# -- files --------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_adapters(path: str | Path, adapters: dict[int, ExitAdapter], fingerprint) -> str:
    """Write ``adapters`` (exit depth -> adapter); returns the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, rank = {}, None
    for depth, adapter in sorted(adapters.items()):
        rank = adapter.rank
        for name, p in adapter.state_dict().items():
            tensors[f"exit.{depth}.{name}"] = p.detach().float().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "depths": json.dumps(sorted(adapters)),
        "rank": json.dumps(rank),
        "fingerprint": json.dumps(asdict(fingerprint)),
    }
    save_file(tensors, str(path), metadata=meta)
    return file_sha256(path)


def load_adapters(path: str | Path, fingerprint, dtype: torch.dtype, device: torch.device) -> tuple[dict[int, ExitAdapter], str]:
    """Read adapters written by :func:`save_adapters`; refuses another model's."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    from .points import ModelFingerprint

    path = Path(path).expanduser()
    if not path.is_file():
        raise ExitCalibrationError(f"{path}: no such adapters file; run `wattserve exits fit` or fix adapters_path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ExitCalibrationError(f"{path}: not an adapters file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ExitCalibrationError(f"{path}: not a {FORMAT} file; refit with `wattserve exits fit`")
    theirs = ModelFingerprint(**json.loads(meta["fingerprint"]))
    if not theirs.matches(fingerprint):
        raise ExitCalibrationError(f"{path}: adapters were fitted on another model ({theirs} vs {fingerprint}); refit")
    rank = json.loads(meta["rank"])
    adapters = {}
    for depth in json.loads(meta["depths"]):
        adapter = ExitAdapter(fingerprint.hidden_size, rank)
        prefix = f"exit.{depth}."
        adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        adapters[int(depth)] = adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return adapters, file_sha256(path)


# -- fitting ------------------------------------------------------------------------------------
@dataclass(slots=True)
class FitSettings:
    rank: int | None = None  # None: full affine map
    ridge: float = 1e-3  # ridge strength relative to the mean feature energy
    epochs: int = 1  # distillation passes over the fit tokens (0: closed form only)
    batch_tokens: int = 256
    lr: float = 1e-4
    teacher_top: int = 32  # the last layer's top tokens per position in the candidate vocabulary
    sampled_vocab: int = 2048  # random extra tokens per batch in the candidate vocabulary
    seed: int = 0


def closed_form(h_exit: torch.Tensor, h_last: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of ``h_last - h_exit`` on ``[h_exit, 1]``: returns ``(A, b)`` with the
    residual predicted as ``h_exit @ A + b``. Inputs ``(N, hidden)``; solved in float64."""
    x = torch.cat([h_exit.double(), torch.ones(h_exit.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x
    strength = ridge * float(gram.diagonal()[:-1].mean())
    gram += strength * torch.eye(gram.shape[0], dtype=torch.float64)
    sol = torch.linalg.solve(gram, x.T @ (h_last.double() - h_exit.double()))
    return sol[:-1].float(), sol[-1].float()


def distill(
    adapter: ExitAdapter,
    h_exit: torch.Tensor,
    h_last: torch.Tensor,
    teacher_top: torch.Tensor,
    logits_on: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    vocab_size: int,
    settings: FitSettings,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """KL(last layer || exit) over a candidate vocabulary per batch; only ``adapter`` learns.

    ``h_exit``, ``h_last``: ``(N, hidden)`` states at the exit and the last layer;
    ``teacher_top``: ``(N, k)`` the last layer's top token ids; ``logits_on(h, ids)`` the
    shared head's logits ``(n, len(ids))`` (final norm included). Candidates per batch: the
    batch's teacher top tokens plus ``sampled_vocab`` random ones.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(adapter.parameters(), lr=settings.lr)
    n = h_exit.shape[0]
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch_tokens):
            idx = order[start : start + settings.batch_tokens]
            extra = torch.randint(vocab_size, (settings.sampled_vocab,), generator=gen)
            cand = torch.unique(torch.cat([teacher_top[idx].flatten(), extra])).to(h_exit.device)
            with torch.no_grad():
                t_logp = torch.log_softmax(logits_on(h_last[idx], cand), dim=-1)
            s_logp = torch.log_softmax(logits_on(adapter(h_exit[idx]), cand), dim=-1)
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(float(loss.detach()))


def agreement(exit_ids: torch.Tensor, final_ids: torch.Tensor) -> float:
    """Share of positions where the exit's top token equals the last layer's."""
    return float((exit_ids == final_ids).float().mean()) if final_ids.numel() else math.nan
