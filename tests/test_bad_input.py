"""Generated malformed load, plan, model and cluster files through each command's entry (what `cli.main` dispatches
to): the exit code is always 0 or 2, no exception escapes, and an output file is either absent or whole."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnq_ep.cli import main
from rnq_ep.memory import plain_ep_budget
from rnq_ep.specs import Plan, load_cluster, load_model

MODEL = msgspec.to_builtins(load_model("tiny"))
CLUSTER = {**msgspec.to_builtins(load_cluster("cpu4")), "gpus_per_node": 2}
LOADS = {"counts": [[900, 50, 40, 30, 20, 10, 5, 1], [10, 10, 10, 10, 10, 10, 10, 930]], "num_experts": 8, "top_k": 2,
         "layer_ids": [0, 1]}
PLAN = {  # every expert on the one worker, in bf16: the tiny model on one CPU worker
    "model": MODEL, "cluster": {**CLUSTER, "gpus_per_node": 1},
    "options": {"formats": ["bf16"], "quality_budget": 0.0, "memory_budget": plain_ep_budget(load_model("tiny"), 1)},
    "layers": [{"layer": layer, "slots": [{"gpu": 0, "expert": e, "fmt": "bf16", "share": 1.0} for e in range(8)]}
               for layer in (0, 1)],
}
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# small numbers keep a run's seeded weights small (a plan's widths size the layers it builds); the rest are the
# edges that broke commands before: zero, negative, past int64, NaN, infinities, 1e30, the wrong type
SMALL = st.integers(-3, 300)
EDGES = st.one_of(st.sampled_from([0, -1, 10**30, 2**63, 1e30, 1e23, -0.5]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.none(), st.booleans(),
                  st.lists(SMALL, max_size=3))


def paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (dict keys and list indices), the document itself first."""
    found = [prefix]
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found += paths(child, (*prefix, key))
    return found


@st.composite
def malformed(draw, document: dict, values: st.SearchStrategy = st.one_of(SMALL, EDGES)) -> bytes:
    """`document` as JSON after 1-3 edits (set, delete, add an unknown key), or cut short, or not JSON at all."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "cut", "garbage"]))
    text = json.dumps(document)
    if kind == "cut":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "garbage":
        return draw(st.binary(max_size=40))
    document = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(document)[1:]))
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["set", "set", "delete", "unknown"]))
        if action == "set":
            parent[where[-1]] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif action == "delete":
            parent.pop(where[-1])
        elif isinstance(parent, dict):
            parent["unknown_key"] = 1
    return json.dumps(document, allow_nan=True).encode()


def written(folder: Path, files: dict[str, bytes | dict]) -> dict[str, str]:
    """Write each file (bytes as given, a dict as JSON) into folder; name -> path."""
    out = {}
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        out[name] = str(path)
    return out


def assert_exit_0_or_2_and_whole_outputs(argv: list[str], folder: Path, outputs: list[str], capsys) -> None:
    """cli.main(argv) returns 0 or 2 without raising, 2 with one line on stderr; each output exists only after 0,
    and no temp file is left."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), code
    assert code == 0 or (err.count("\n") == 1 and err.startswith(f"rnq-ep {argv[0]}: error: ")), err
    for name in outputs:
        assert (folder / name).exists() == (code == 0), (name, code)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


def one_malformed(draw, documents: dict[str, dict], values: st.SearchStrategy = st.one_of(SMALL, EDGES)) -> dict:
    """The documents with one of them, drawn, malformed."""
    broken = draw(st.sampled_from(sorted(documents)))
    return {name: draw(malformed(doc, values)) if name == broken else doc for name, doc in documents.items()}


def command_on_malformed_model_cluster_or_loads(data, capsys, command: list[str], output: str) -> Path | None:
    """`rnq-ep COMMAND --model --cluster --loads` (one file malformed) writing `output` into a folder of its own,
    checked by assert_exit_0_or_2_and_whole_outputs; the output's text when the command wrote it."""
    files = one_malformed(data.draw, {"model.json": MODEL, "cluster.json": CLUSTER, "loads.json": LOADS})
    with tempfile.TemporaryDirectory() as folder:
        given_files = written(Path(folder), files)
        out = Path(folder, "out")
        out.mkdir()
        argv = [command[0], "--model", given_files["model.json"], "--cluster", given_files["cluster.json"],
                "--loads", given_files["loads.json"], "--tokens-per-gpu", "64", *command[1:], str(out / output)]
        assert_exit_0_or_2_and_whole_outputs(argv, out, [output], capsys)
        return (out / output).read_text() if (out / output).exists() else None


@SETTINGS
@given(st.data())
def test_plan_on_malformed_model_cluster_or_loads_exits_0_or_2_with_a_whole_plan(capsys, data):
    plan = command_on_malformed_model_cluster_or_loads(data, capsys, ["plan", "--out"], "plan.json")
    if plan is not None:
        msgspec.json.decode(plan, type=Plan)


@SETTINGS
@given(st.data())
def test_simulate_on_malformed_model_cluster_or_loads_exits_0_or_2_with_whole_markdown(capsys, data):
    markdown = command_on_malformed_model_cluster_or_loads(data, capsys, ["simulate", "--sweep", "none", "--markdown"],
                                                           "sim.md")
    assert markdown is None or "rnq-ep simulate" in markdown


@SETTINGS
@given(st.data())
def test_run_on_a_malformed_plan_model_or_loads_exits_0_or_2(data):
    files = one_malformed(data.draw, {"plan.json": PLAN, "model.json": MODEL, "loads.json": LOADS})
    with tempfile.TemporaryDirectory() as folder:
        given_files = written(Path(folder), files)
        argv = ["run", "--plan", given_files["plan.json"], "--model", given_files["model.json"],
                "--loads", given_files["loads.json"], "--steps", "1", "--tokens", "4", "--backend", "torch"]
        assert main(argv) in (0, 2)


def test_the_base_documents_are_valid_so_failures_come_from_the_edits():
    with tempfile.TemporaryDirectory() as folder:
        given_files = written(Path(folder), {"plan.json": PLAN, "model.json": MODEL, "loads.json": LOADS,
                                             "cluster.json": CLUSTER})
        assert main(["run", "--plan", given_files["plan.json"], "--loads", given_files["loads.json"], "--steps", "1",
                     "--tokens", "4", "--backend", "torch"]) == 0
        assert main(["plan", "--model", given_files["model.json"], "--cluster", given_files["cluster.json"], "--loads",
                     given_files["loads.json"], "--out", str(Path(folder, "p.json")), "--tokens-per-gpu", "64"]) == 0


def test_bench_layer_with_zero_repeats_exits_2_with_its_line(capsys):
    assert main(["bench", "layer", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats and --steps must be >= 1" in err
