"""Client commands against a running server: ``wattserve generate`` and ``wattserve status``."""

from __future__ import annotations

import sys

from .connect import DEFAULT_TARGET, add_connection_args, channel

__all__ = ["DEFAULT_TARGET"]  # other command modules import it from here


def cmd_generate(args) -> int:
    import grpc

    from ..api.gen import wattserve_pb2 as pb
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop)
    if args.seed is not None:
        sampling.seed = args.seed
    chat = args.chat or args.system is not None  # the prompt becomes the user's turn of a chat
    messages = [pb.ChatMessage(role="system", content=args.system)] if args.system is not None else []
    if chat:
        messages.append(pb.ChatMessage(role="user", content=args.prompt))
    req = pb.GenerateRequest(
        prompt="" if chat else args.prompt,
        messages=messages,
        max_tokens=args.max_tokens,
        sampling=sampling,
        expert=args.expert or "",
        priority=pb.Priority.Value(f"PRIORITY_{args.priority.upper()}"),
        tenant=args.tenant or "",
    )
    if args.budget_j is not None:
        req.energy_budget_j = args.budget_j
    if args.latency_budget_ms is not None:
        req.latency_budget_ms = args.latency_budget_ms
    if args.compute_budget is not None:
        req.compute_budget = args.compute_budget
    with channel(args) as ch:
        stub = pb_grpc.InferenceStub(ch)
        try:
            usage = None
            for msg in stub.Generate(req, timeout=args.timeout):
                if msg.HasField("chunk"):
                    print(msg.chunk.text, end="", flush=True)
                else:
                    usage = msg.usage
        except KeyboardInterrupt:
            print("\n[cancelled]", file=sys.stderr)
            return 130
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print()
    if usage is not None:
        print(
            f"-- expert {usage.expert}/{usage.replica} | {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens | finish {usage.finish_reason} | "
            f"TTFT {usage.ttft_ms:.0f} ms | total {usage.total_latency_ms:.0f} ms | "
            f"energy {usage.energy_j:.3f} J ({usage.energy_source})",
            file=sys.stderr,
        )
        print(f"-- routing ({usage.routing_policy}): {usage.routing_reason}"
              + ("  [BUDGET EXCEEDED]" if usage.budget_exceeded else ""), file=sys.stderr)
        _print_exits(usage)
    return 0


def _print_exits(usage) -> None:
    if usage.num_layers:  # the expert has early exit
        print(
            f"-- early exit: {usage.avg_exit_layer:.1f}/{usage.num_layers} layers per token "
            f"(point {usage.exit_operating_point}), {usage.layers_skipped} layers skipped, "
            f"compute {usage.compute_fraction:.0%}, ~{usage.energy_saved_j:.3f} J saved (gross estimate), "
            + (f"{usage.energy_saved_net_j:.3f} J net of measured steps" if usage.HasField("energy_saved_net_j")
               else "net not measured (no full-depth reference)"),
            file=sys.stderr,
        )


def cmd_status(args) -> int:
    import grpc

    from ..api.gen import wattserve_pb2 as pb
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    with channel(args) as ch:
        admin = pb_grpc.AdminStub(ch)
        try:
            status = admin.GetStatus(pb.GetStatusRequest(), timeout=args.timeout)
            experts = admin.ListExperts(pb.ListExpertsRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(
        f"wattserve {status.version} at {args.target}: up {status.uptime_s:.0f} s, ray {status.ray_address}, "
        f"policy {status.routing_policy} (gate {status.gate or '-'})\n"
        f"  replicas healthy {status.healthy_replicas}/{status.total_replicas}, in flight "
        f"{status.inflight}/{status.max_inflight}, requests {status.requests_total} "
        f"({status.requests_failed} failed)\n"
        f"  energy: requests {status.requests_energy_j:.2f} J, idle {status.idle_energy_j:.2f} J "
        f"({', '.join(status.energy_sources) or 'no source yet'})"
    )
    header = f"  {'expert':<10} {'rep':>3} {'ok':>3} {'run':>4} {'wait':>4} {'prefill ms/tok':>14} {'decode ms/step':>14} {'J/tok':>8}  model (engine, source)"
    print(header)
    for e in experts.experts:
        for r in e.replicas:
            print(
                f"  {e.name:<10} {r.replica:>3} {'yes' if r.healthy else 'NO':>3} {r.running:>4} {r.waiting:>4} "
                f"{r.prefill_ms_per_token:>14.2f} {r.decode_ms_per_token:>14.2f} {r.j_per_token:>8.4f}  "
                f"{e.model} ({e.engine}, {e.energy_source}){'  ' + r.error if r.error else ''}"
            )
            if r.exit_histogram:
                tokens = sum(r.exit_histogram.values())
                avg = sum(d * n for d, n in r.exit_histogram.items()) / tokens
                hist = " ".join(f"{d}:{n}" for d, n in sorted(r.exit_histogram.items()))
                print(f"  {'':<10} early exit: {avg:.1f}/{r.num_layers} layers per decode token; exits {hist}")
    errors = [(e.name, call, p) for e in experts.experts
              for call, p in (("generate", e.prediction), ("score", e.score_prediction)) if p.samples]
    if errors:
        print("  router cost predictions (EWMA |predicted - measured| / measured):")
        for name, call, p in errors:
            print(f"  {name:<10} {call:<8} energy {p.energy_rel_error:6.1%} (x{p.energy_correction:.2f})  "
                  f"latency {p.latency_rel_error:6.1%} (x{p.latency_correction:.2f})  over {p.samples} requests")
    return 0



def register(sub) -> None:
    s = sub.add_parser("generate", help="send a prompt and stream the answer")
    s.add_argument("prompt")
    add_connection_args(s)
    s.add_argument("--expert", help="pin an expert by name (default: the router decides)")
    s.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message: the expert applies its chat template")
    s.add_argument("--system", help="a system message before the prompt (implies --chat)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--budget-j", type=float, help="energy budget for this request in joules")
    s.add_argument("--latency-budget-ms", type=float, help="latency budget in milliseconds")
    s.add_argument("--compute-budget", type=float, help="early exit: share of full depth per token, in (0, 1]")
    s.add_argument("--priority", choices=["low", "normal", "high"], default="normal")
    s.add_argument("--tenant")
    s.add_argument("--timeout", type=float, default=120.0, help="gRPC deadline in seconds")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("status", help="show experts, load and energy of a running server (operator key)")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_status)
