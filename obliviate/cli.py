"""The `obliviate` command line. Heavy libraries are imported inside commands, so --help is fast.

Every command reads params.yaml (or --params), runs the matching Prefect flow, and turns a user
error into one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

# click's UsageError, from typer's copy of click or from click itself (older typer)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _usage_in_one_line():
    """A mistyped command line (unknown command or option, a value of the wrong type, a missing
    option) as one line and exit 2, instead of click's usage text and error box."""
    try:
        yield
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `obliviate` alone prints the help
            raise
        message = " ".join(exc.format_message().split()).rstrip(".")
        where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "obliviate --help"
        typer.echo(f"error: {message}; see `{where}`.", err=True)
        raise typer.Exit(2) from None


class _OneLineUsageErrors(TyperGroup):
    def make_context(self, *args, **kwargs):
        with _usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="DeepObliviate machine unlearning: stored training, deletion, verification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read (paths are relative to it).")
]


IdsArg = Annotated[list[str] | None, typer.Argument(help="Sample ids to forget.")]
IdsFileOpt = Annotated[Path | None, typer.Option("--file", "-f", help="JSON-lines file of ids.")]
ForceOpt = Annotated[bool, typer.Option(help="Allow emptying a block or removing a whole class.")]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="If another deletion, drain or training holds the writer lock, wait up to this "
        "long for it (default: fail at once, naming the holder).",
    ),
]  # fmt: skip


def _requested(ids: list[str] | None, file: Path | None) -> list[str]:
    """The ids named on the command line and in --file; an empty or undecodable id (argv bytes
    that are not UTF-8) is refused here, before Prefect starts."""
    from obliviate.requests import check_ids, read_request_file

    wanted = list(ids or []) + (read_request_file(file) if file else [])
    check_ids(wanted)
    return wanted


def _user_errors(fn):
    """Print an ObliviateError as one line and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from obliviate.errors import ObliviateError

        try:
            return fn(*args, **kwargs)
        except ObliviateError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _setup(params: Path):
    """Load the config, then prepare Prefect (its environment must be set before import)."""
    from obliviate.config import load_config
    from obliviate.runtime import configure_prefect, quiet_console

    cfg = load_config(params)
    configure_prefect(cfg.root)
    import flows.pipeline

    quiet_console()
    return cfg, flows.pipeline


@app.command()
@_user_errors
def check(
    params: ParamsOpt = Path("params.yaml"),
    mark: Annotated[
        Path | None,
        typer.Option(help="Once params.yaml passes, write this file (always the same bytes)."),
    ] = None,
) -> None:
    """Validate every section of params.yaml and change nothing: dvc.yaml's first stage, so that
    a typo stops `dvc repro` before DVC removes any stage's outputs."""
    from obliviate.config import load_config

    cfg = load_config(params)
    if mark is not None:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("params.yaml passed `obliviate check`\n")
    typer.echo(f"{params}: valid ({cfg.prepare.dataset}, B={cfg.prepare.blocks})")


@app.command()
@_user_errors
def partition(params: ParamsOpt = Path("params.yaml")) -> None:
    """Split the training set into B label-balanced blocks under data/ (gated by GX)."""
    cfg, flows = _setup(params)
    summary = flows.partition_flow(cfg)
    typer.echo(
        f"partitioned {summary['train_samples']} {summary['dataset']} samples "
        f"into {summary['blocks']} blocks at {cfg.paths.blocks}"
    )


@app.command()
@_user_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    overwrite: Annotated[
        bool, typer.Option(help="Replace a store built with other params.")
    ] = False,
    allow_inexact: Annotated[
        bool,
        typer.Option(
            help="Resume on another device class than the store's (replay not bit-exact); "
            "the measured difference is recorded in the store."
        ),
    ] = False,
) -> None:
    """Stored training: train blocks 1..B in order, storing P_0..P_B (resumes if interrupted)."""
    cfg, flows = _setup(params)
    s = flows.train_flow(cfg, overwrite, allow_inexact)
    mib, ratio = s["stored_bytes"] / 2**20, s["stored_bytes"] / s["raw_bytes"]
    typer.echo(
        f"stored P_0..P_{s['completed']} of {s['model']} on {s['dataset']} at {s['store']} "
        f"({mib:.1f} MiB, {ratio:.2f} of raw)"
    )
    _warn_if_poor(s.get("original"))


def _warn_if_poor(metrics: dict | None) -> None:
    from obliviate.evaluate import poor_model_warning

    warning = poor_model_warning(metrics) if metrics else None
    if warning:
        typer.echo(warning, err=True)


@app.command()
@_user_errors
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Test accuracy of the served model P_B; writes metrics/evaluate.json."""
    cfg, flows = _setup(params)
    m = flows.evaluate_flow(cfg)
    typer.echo(
        f"test accuracy {m['accuracy']:.4f} on {m['n_test']} samples "
        f"(checkpoint P_{m['checkpoint']}; majority-class rate {m['majority_rate']:.4f})"
    )
    _warn_if_poor(m)


@app.command()
@_user_errors
def run(
    params: ParamsOpt = Path("params.yaml"),
    overwrite: Annotated[
        bool, typer.Option(help="Replace a store built with other params.")
    ] = False,
) -> None:
    """partition, train and evaluate in one flow run."""
    cfg, flows = _setup(params)
    m = flows.pipeline_flow(cfg, overwrite)
    typer.echo(f"test accuracy {m['accuracy']:.4f} on {m['n_test']} samples")


@app.command()
@_user_errors
def info(
    params: ParamsOpt = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Store size, B, recipe and the parameter layout."""
    from rich.console import Console
    from rich.table import Table

    from obliviate.config import load_config
    from obliviate.store import ParamStore

    cfg = load_config(params)
    store = ParamStore.open(cfg.paths.store)
    meta = store.meta
    summary = store.summary()
    if as_json:
        typer.echo(json.dumps({**summary, "layout": meta["layout"]}, indent=2))
        return
    console = Console()
    table = Table(title=f"obliviate store {store.path}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    table.add_row("stored / raw", f"{summary['stored_bytes'] / summary['raw_bytes']:.3f}")
    console.print(table)
    from obliviate.consolidation import Exactness

    console.print(Exactness.of(cfg, store).describe(cfg))
    lay = Table("tensor", "shape", "offset", "kind", title="layout of one row")
    for e in meta["layout"]:
        lay.add_row(e["name"], str(tuple(e["shape"])), str(e["offset"]), e["kind"])
    console.print(lay)


@app.command()
@_user_errors
def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="safetensors or pt (a torch state dict).")
    ] = "safetensors",
    row: Annotated[
        int | None, typer.Option(help="Row K of the store (P_K); default: the served model P_B.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Export a stored model as a state dict, with a JSON sidecar naming how to use it."""
    from obliviate.config import load_config
    from obliviate.export import export_model, sidecar_path

    s = export_model(load_config(params), output, fmt, row)
    served = " (served)" if s["served"] else ""
    typer.echo(
        f"exported P_{s['row']}{served} of {s['architecture']['model']} to {output} ({fmt}); "
        f"sidecar {sidecar_path(output)}"
    )


@app.command()
@_user_errors
def ids(
    block: Annotated[int, typer.Option(help="Block number, 1..B.")] = 0,
    owner: Annotated[bool, typer.Option(help="The verifying owner's samples instead.")] = False,
    limit: Annotated[int, typer.Option(help="Print at most this many.")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Sample ids, one per line: of a block, or the verifying owner's still in the data."""
    from obliviate.config import load_config
    from obliviate.errors import RequestError
    from obliviate.partition import load_block, read_manifest
    from obliviate.verify import owners_present

    cfg = load_config(params)
    manifest = read_manifest(cfg.paths.blocks)
    if owner:
        found = owners_present(cfg, manifest)
    elif 1 <= block <= manifest["n_blocks"]:
        found = list(load_block(cfg.paths.blocks, block).ids)
    else:
        raise RequestError(f"choose --block 1..{manifest['n_blocks']} or --owner.")
    for sid in found[:limit] if limit > 0 else found:
        typer.echo(sid)


@app.command()
@_user_errors
def forget(
    ids: IdsArg = None,
    file: IdsFileOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Forget samples by id now: retrain from their block with the residual-memory stop, stitch.

    The ids are queued like `obliviate request` does (so Prefect sees a request id, never a
    sample id) and the forget flow drains that one request at once."""
    import time

    from obliviate.errors import RequestError

    wanted = _requested(ids, file)
    if not wanted:
        raise RequestError("name the sample ids to forget, or pass --file requests.jsonl.")
    cfg, _ = _setup(params)
    import flows.deletion
    from obliviate.deletion import forget as forget_now

    start = time.perf_counter()
    record = forget_now(cfg, wanted, force, wait=wait, drain_with=lambda request, wait: (
        flows.deletion.forget_flow(str(params.resolve()), request, wait)))  # fmt: skip
    typer.echo(_deletion_lines(cfg, record, len(wanted), time.perf_counter() - start))
    _consolidate_if_due(params, record["consolidation_due"])


def _consolidate_if_due(params: Path, reason: str | None) -> None:
    """After a forget or drain from the command line (its requests done): a refused stitch
    committed under forget.on_refusal: consolidate is consolidated now, in this command; for
    another trigger, say it is due (the scheduled deployments run it by themselves)."""
    if reason is None:
        return
    if not reason.startswith("a refused stitch"):
        typer.echo(f"consolidation due ({reason}): run `obliviate consolidate`, or let the "
                   "scheduled deployment (`obliviate serve`) do it")  # fmt: skip
        return
    import flows.consolidation

    typer.echo(f"consolidating now ({reason}) ...")
    out = flows.consolidation.consolidate_flow(str(params.resolve()))
    typer.echo(out["sentence"])


def _deletion_lines(cfg, r: dict, n: int, seconds: float) -> str:
    """What `forget` prints about the deletion that forgot its samples (its record r, one part
    per sweep): the Delta series shortened (the audit record and the plot keep all of it)."""
    sweeps = r["sweeps"]
    plan = f", in {len(sweeps)} sweeps" if len(sweeps) > 1 else ""
    lines = [f"forgot {n} sample(s) in {seconds:.1f} s{plan}:"]
    for s in sweeps:
        if not s["retrained_blocks"]:
            lines.append(f"  {s['request_id']}: only validation samples, nothing retrained")
            continue
        lines.append(
            f"  {s['request_id']}: retrained blocks {s['first_block']}..{s['stop_block']} "
            f"(t={s['t']}, {s['reason']}); Delta: {delta_summary(s['deltas'])}"
        )
        g = s.get("guard")
        if g:
            lines.append(
                f"    validation accuracy {g['accuracy']:.4f} (original "
                f"{g['reference_accuracy']:.4f}; {s['guard_rejections']} stitch(es) refused by "
                "the accuracy guard)"
            )
    plots = [str(cfg.paths.reports / f"{s['request_id']}.png") for s in sweeps if s["deltas"]]
    acc = r.get("test_accuracy_after")
    tested = f"{acc:.4f}" if acc is not None else "not refreshed (see `obliviate status`)"
    deleted = sum(s.get("purged_remote_objects", 0) for s in sweeps)
    remote = {"done": f"; DVC remote: {deleted} old object(s) deleted",
              "pending": "; DVC remote: purge pending (see the warning)"}  # fmt: skip
    lines.append(
        f"  test accuracy of the unlearned model {tested}; versioned: {r.get('versioned')}"
        + remote.get(r.get("remote_purge"), "")
        + (f"; plot: {', '.join(plots)}" if plots else "")
    )
    return "\n".join(lines)


def delta_summary(deltas: list[float], edge: int = 3) -> str:
    """The Delta series as a line reads well: every value when there are few, else the first
    and last ``edge`` values around the count left out."""
    shown = [f"{d:.3g}" for d in deltas]
    if len(shown) > 2 * edge + 1:
        shown = [*shown[:edge], f"... ({len(deltas) - 2 * edge} more) ...", *shown[-edge:]]
    return ", ".join(shown)


@app.command()
@_user_errors
def retrain(
    naive: Annotated[
        bool, typer.Option("--naive", help="Retrain from scratch (required).")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The naive reference: retrain every block from P_0 without the forgotten samples."""
    import time

    from obliviate.errors import ObliviateError

    if not naive:
        raise ObliviateError("only naive retraining exists; run `obliviate retrain --naive`.")
    cfg, _ = _setup(params)
    from obliviate.compare import compare_with_naive

    start = time.perf_counter()
    c = compare_with_naive(cfg)
    wall = time.perf_counter() - start
    typer.echo(
        f"naive retrain of {c['blocks']} blocks in {wall:.1f} s -> {cfg.paths.naive_store}\n"
        f"  accuracy: naive {c['naive_accuracy']:.4f}, served {c['served_accuracy']:.4f}; "
        f"consistency(served, naive) {c['consistency']:.4f}"
    )
    if c["served_sha256"] == c["naive_sha256"]:
        typer.echo(f"  served P_B and naive P_B: byte-identical (sha256 {c['naive_sha256'][:16]})")
    else:
        typer.echo(
            f"  served P_B and naive P_B differ (sha256 {c['served_sha256'][:16]} and "
            f"{c['naive_sha256'][:16]}): the store is exact through row "
            f"{c['served_exact_through']} of {c['blocks']}; `obliviate consolidate` makes it "
            "the naive model"
        )
    if c.get("last_deletion_s"):
        typer.echo(
            f"  last deletion: {c['last_deletion_s']:.2f} s from accepted to staged (retraining, "
            f"guard, staging), speed-up {c['naive_s'] / c['last_deletion_s']:.1f}x against "
            f"naive's {c['naive_s']:.1f} s of stored training; the benchmarks' definition, "
            "without process start-up, the commit and the test metric (docs/benchmarks.md)"
        )


@app.command()
@_user_errors
def verify(params: ParamsOpt = Path("params.yaml")) -> None:
    """Backdoor-based verification of the owner's deletion; exits 1 when not supported."""
    from obliviate.verify import VerificationFailed

    cfg, _ = _setup(params)
    import flows.verify

    try:
        result = flows.verify.verify_flow(cfg)
    except VerificationFailed as exc:
        typer.echo(f"verification: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"verification: {result['sentence']}")


@app.command()
@_user_errors
def report(params: ParamsOpt = Path("params.yaml")) -> None:
    """Measure the deletion grid and the naive/obliviate/SISA comparison; write the report."""
    cfg, _ = _setup(params)
    from obliviate.report import estimated_cost, seconds_per_block

    typer.echo(estimated_cost(cfg, seconds_per_block(cfg)))
    import flows.report

    typer.echo(f"report written to {flows.report.report_flow(cfg)}")


@app.command()
@_user_errors
def request(
    ids: IdsArg = None,
    file: IdsFileOpt = None,
    force: ForceOpt = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Queue a deletion request and print its id at once; the next drain forgets it."""
    from obliviate import lifecycle
    from obliviate.config import load_config

    typer.echo(lifecycle.submit(load_config(params), _requested(ids, file), force))


@app.command()
@_user_errors
def drain(wait: WaitOpt = 0, params: ParamsOpt = Path("params.yaml")) -> None:
    """Forget every queued request now, in one sweep (what the scheduled deployment runs)."""
    _setup(params)
    import flows.deletion

    out = flows.deletion.drain_flow(str(params.resolve()), wait=wait)
    deletion = f" by deletion {out.record['deletion']}" if out.record else ""
    crashed = f" (finished after a crash: {', '.join(out.recovered)})" if out.recovered else ""
    refreshed = "" if out.accuracy is None else f"; test accuracy {out.accuracy:.4f}"
    typer.echo(f"drained: {len(out.done)} request(s) done{deletion}{crashed}, "
               f"{len(out.refused)} refused{refreshed}")  # fmt: skip
    _consolidate_if_due(params, out.consolidation_due)


@app.command()
@_user_errors
def serve(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule; default: params.yaml serve.cron.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the drain and consolidate deployments: a Prefect server runs them on schedule."""
    from obliviate.config import five_field_cron
    from obliviate.errors import ObliviateError

    if cron is not None and not five_field_cron(cron):  # before anything else: a typo is cheap
        raise ObliviateError(
            f"--cron {cron[:40]!r} must be a 5-field cron schedule with valid values, "
            "e.g. '*/15 * * * *'."
        )
    cfg, _ = _setup(params)  # params.yaml's serve.cron was checked when it was read
    from prefect.settings import PREFECT_API_URL

    import flows.deletion

    schedule = cron or cfg.serve.cron
    if not PREFECT_API_URL.value():
        raise ObliviateError(
            "obliviate serve needs a Prefect server to schedule runs: start `prefect server "
            "start` and export PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    from prefect import serve as serve_all

    import flows.consolidation

    name, path = cfg.serve.deployment, str(params.resolve())
    typer.echo(f"serving deployments drain/{name} on '{schedule}' and consolidate/{name} on "
               f"'{cfg.consolidate.cron}'")  # fmt: skip
    serve_all(  # one run of each at a time: a slow drain is not overtaken by the next one
        flows.deletion.drain_flow.to_deployment(
            name=name, cron=schedule, parameters={"params": path}, concurrency_limit=1
        ),
        flows.consolidation.consolidate_flow.to_deployment(
            name=name,
            cron=cfg.consolidate.cron,
            parameters={"params": path},
            concurrency_limit=1,
        ),
    )


@app.command()
@_user_errors
def status(
    request_id: Annotated[str | None, typer.Argument(help="A request id from `request`.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """One request's state, or the store, the last deletions, the requests and the metrics."""
    from obliviate import lifecycle
    from obliviate.config import load_config

    cfg = load_config(params)
    if request_id:
        from obliviate.errors import RequestError, shown_id

        if shown_id(request_id) != request_id:  # no request id is this long or holds controls
            raise RequestError(
                f"no deletion request {shown_id(request_id)}; use the id that `obliviate "
                "request` printed."
            )
        entry = lifecycle.get(cfg, request_id)
        typer.echo(lifecycle.describe(entry))
        if entry["status"] == "done" and str(entry.get("deletion", "")).startswith("del-"):
            from obliviate.audit import read_records
            from obliviate.consolidation import exact_at

            since = exact_at(read_records(cfg.paths.audit))
            parts = [r["request_id"] for r in read_records(cfg.paths.audit)
                     if r["request_id"].startswith(entry["deletion"])]  # fmt: skip
            when = [since.get(p) for p in parts]
            typer.echo("  exact since " + max(when) if all(when)
                       else "  approximate: exact at the next consolidation")  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    from obliviate.audit import read_records
    from obliviate.errors import StoreError
    from obliviate.store import ParamStore

    requests = lifecycle.entries(cfg)  # read everything first: a damaged file is one sentence
    records = read_records(cfg.paths.audit)
    console = Console()
    try:
        s = ParamStore.open(cfg.paths.store).summary()
        console.print(
            f"store {s['store']}: {s['dataset']}/{s['model']}, {s['completed']}/{s['blocks']} "
            f"blocks, {s['deletion_shifts']} stitching shift(s), "
            f"{s['stored_bytes'] / 2**20:.1f} MiB"
        )
    except StoreError as exc:
        console.print(f"store: {exc}")
    table = Table(
        "deletion",
        "finished",
        "samples",
        "blocks",
        "t",
        "accuracy",
        title=f"last deletions ({len(records)} in all)",
    )
    for r in records[-5:]:
        if r.get("kind") == "consolidation":
            rows = f"{r['first_block']}..{r['stop_block']}"
            table.add_row(r["request_id"], r["finished_at"], "-", rows, "-", "consolidation")
            continue
        blocks = ",".join(map(str, r["blocks"]))
        n = str(len(r["sample_id_hashes"]))
        table.add_row(r["request_id"], r["finished_at"], n, blocks, str(r["t"]),
                      _accuracy(r))  # fmt: skip
    console.print(table)
    counts = {k: sum(e["status"] == k for e in requests) for k in lifecycle.STATUSES}
    console.print("requests: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    waiting = [e for e in requests if e["status"] not in ("done", "refused")]
    for e in waiting or requests[-1:]:  # what is pending, else the latest request
        console.print("  " + lifecycle.describe(e))
    console.print(lifecycle.describe_metrics(cfg))
    from obliviate.consolidation import Exactness

    with contextlib.suppress(StoreError):  # (a missing store is said above)
        console.print("store: " + Exactness.of(cfg).describe(cfg))


@app.command()
@_user_errors
def audit(
    params: ParamsOpt = Path("params.yaml"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the records as JSON lines.")
    ] = False,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate", help="Rewrite unkeyed id hashes as keyed ones (reads the data source)."
        ),
    ] = False,
) -> None:
    """The deletion history: one line per deletion, hashes only."""
    from rich.console import Console
    from rich.table import Table

    from obliviate.audit import read_records
    from obliviate.config import load_config

    cfg = load_config(params)
    if migrate:
        from obliviate import audit as trail
        from obliviate import lifecycle
        from obliviate.data import load_dataset
        from obliviate.transaction import State

        ds = load_dataset(cfg.prepare, cfg.root, cfg.train.image_size)
        candidates = [*map(str, ds.train.ids), *map(str, ds.test.ids)]
        with State.of(cfg).lock():
            done, left = trail.migrate(cfg, candidates, lifecycle.journal_dir(cfg))
        typer.echo(
            f"rewrote {done} audit record(s) with keyed id hashes; {left} left unkeyed (ids not "
            f"in the data source; still recognised); commit {cfg.paths.audit.name}"
        )
        return
    records = read_records(cfg.paths.audit)
    if as_json:
        for r in records:
            typer.echo(json.dumps(r, sort_keys=True))
        return
    from obliviate.consolidation import exact_at

    exact = exact_at(records)
    table = Table("deletion", "committed", "samples", "blocks", "t", "tier", "exact since",
                  "accuracy", "model after")  # fmt: skip
    for r in records:
        if r.get("kind") == "consolidation":
            what = "consolidation" + (": exact prefix" if r.get("partial") else "")
            table.add_row(r["request_id"], r["finished_at"], "-",
                          f"{r['first_block']}..{r['stop_block']}", "-", what,
                          f"{len(r['exact_deletions'])} made exact", "-",
                          r["model_after"][:12])  # fmt: skip
            continue
        tier = r.get("tier") or "approximate"
        if tier == "approximate" and r.get("stitched_at") is not None:
            tier = f"approximate: stitched at t={r['stitched_at']}"
        table.add_row(
            r["request_id"],
            r["finished_at"],
            str(len(r["sample_id_hashes"])),
            ",".join(map(str, r["blocks"])),
            str(r["t"]),
            tier,
            exact.get(r["request_id"], "pending"),
            _accuracy(r),
            r["model_after"][:12],
        )
    Console().print(table if records else "no deletions yet")


@app.command()
@_user_errors
def consolidate(
    if_due: Annotated[
        bool, typer.Option("--if-due", help="Only when a trigger in params.yaml fires.")
    ] = False,
    wait: WaitOpt = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Make every deletion exact: retrain from the first inexact row to B (P_B = naive)."""
    _setup(params)
    import flows.consolidation

    out = flows.consolidation.consolidate_flow(str(params.resolve()), if_due, wait)
    typer.echo(out["sentence"])


@app.command()
@_user_errors
def replay(
    every: Annotated[
        bool, typer.Option("--all", help="Every exact row, from P_0: a naive retrain, compared.")
    ] = False,
    sample: Annotated[int, typer.Option(min=0, help="Spot-check this many random exact rows.")] = 0,
    row: Annotated[list[int] | None, typer.Option(help="Replay this row (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the --sample draw.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The auditor's check: recompute stored rows and compare their bytes; exit 1 on any
    difference, naming the row."""
    from obliviate.config import load_config
    from obliviate.errors import ObliviateError
    from obliviate.replay import replay as run

    if not (every or sample or row):
        raise ObliviateError("choose what to replay: --all, --sample K or --row N.")
    out = run(load_config(params), every=every, sample=sample, rows=row or [], seed=seed)
    approximate = out.n_blocks - out.exact_through
    tail = f"; rows {out.exact_through + 1}..{out.n_blocks} are approximate, not replayed" if (
        approximate) else ""  # fmt: skip
    chain = f"; {out.chain_rows} row(s) checked against the chain of {out.chain}" if (
        out.chain) else ""  # fmt: skip
    if out.passed:
        rows = ", ".join(map(str, out.checked[:12])) + (" ..." if len(out.checked) > 12 else "")
        typer.echo(f"replay: PASS: {len(out.checked)} row(s) replayed ({rows}), every one "
                   f"byte-identical to the store{chain}{tail}")  # fmt: skip
        return
    k, why = out.differing[0]
    typer.echo(f"replay: FAIL: row {k}: {why} ({len(out.differing)} row(s) differ of "
               f"{len(out.checked)} replayed{chain}{tail})", err=True)  # fmt: skip
    raise typer.Exit(1)


@app.command()
@_user_errors
def fsck(params: ParamsOpt = Path("params.yaml")) -> None:
    """Check the store, blocks, manifest, audit chain and journal; exit 2 on any problem."""
    from obliviate.config import load_config
    from obliviate.fsck import check

    cfg = load_config(params)
    problems = check(cfg)
    for p in problems:
        typer.echo(p)
    if problems:
        typer.echo(f"fsck: {len(problems)} problem(s) in {cfg.root}", err=True)
        raise typer.Exit(2)
    typer.echo(f"fsck: {cfg.root} is intact (store, blocks, manifest, audit, journal)")


def _accuracy(record: dict) -> str:
    """An audit record's accuracy of M': validation (now) or test (records before the guard
    judged on the validation split)."""
    if record.get("val_accuracy_after") is not None:
        return f"{record['val_accuracy_after']:.4f} (val)"
    if record.get("accuracy_after") is not None:
        return f"{record['accuracy_after']:.4f} (test)"
    return "-"


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
