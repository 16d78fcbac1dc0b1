"""Image experts in config files: the diffusion engine's keys, its checks, and what it implies."""

from __future__ import annotations

import pytest

from runtime.config import load_config
from wattserve.errors import ConfigError


def _load(tmp_path, experts: str):
    p = tmp_path / "img.yaml"
    p.write_text("experts:\n" + experts)
    return load_config(p)


def test_diffusion_expert_is_an_image_expert(tmp_path):
    cfg = _load(tmp_path, """
  - name: img
    model: {kind: local, path: /models/lcm}
    engine: {kind: diffusion, t_index_list: [0, 16, 32, 45], cfg_type: initialize, similarity_filter: true}
    device: simulated:h100
    priority_class: low
  - name: edge
    engine: synthetic
""")
    img, edge = cfg.experts
    assert (img.modality, edge.modality) == ("image", "text")
    assert img.engine.t_index_list == [0, 16, 32, 45] and img.engine.stream_batch
    assert img.engine.guidance_scale == 1.2 and img.engine.delta == 1.0 and img.engine.max_skip_frames == 10


@pytest.mark.parametrize(
    ("engine", "model", "expected"),
    [
        ("{kind: diffusion, t_index_list: [32, 16]}", "{kind: local, path: /m}", "strictly increasing"),
        ("{kind: diffusion, t_index_list: [10, 50]}", "{kind: local, path: /m}", "strictly increasing"),
        ("{kind: diffusion, frame_buffer_size: 8}", "{kind: local, path: /m}", "max_frame_buffer_size"),
        ("{kind: diffusion, cfg_type: half}", "{kind: local, path: /m}", "cfg_type"),
        ("{kind: diffusion, guidanse_scale: 2}", "{kind: local, path: /m}", r"guidanse_scale: unknown key \(allowed: .*guidance_scale"),
        ("{kind: diffusion}", "{kind: hub, repo_id: org/sd}", "local diffusers-format directory"),
        ("{kind: diffusion}", None, "needs a `model`"),
    ],
)
def test_diffusion_config_errors_name_the_key(tmp_path, engine, model, expected):
    text = f"  - name: img\n    engine: {engine}\n" + (f"    model: {model}\n" if model else "")
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, text)
