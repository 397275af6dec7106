"""Data contracts: model, cluster, planner options, load statistics and plans (msgspec, frozen).

Every struct rejects unknown keys. Loading helpers turn msgspec's errors into `SpecError`s that
name the file, the key path and what was expected, so a bad config never passes silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

Fmt = Literal["bf16", "int8", "int4"]
FORMATS: tuple[str, ...] = ("bf16", "int8", "int4")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MAX_COUNT = 2**48  # tokens per (layer, expert): sums over 2**14 experts stay exact in int64 and float64 ranks
DECODER_LAYERS_PER_MOE_LAYER = 2  # a decoder layer id is below 2 x MoE layers (dense prefixes, every-other-layer MoE)
MAX_WIDTH = 2**20  # hidden and expert widths (DeepSeek-V3: 7168, 2048): expert bytes and their sums stay in int64
MAX_EXPERTS = 2**14  # routed experts per layer (the largest models have hundreds)
MAX_LAYERS = 2**12  # MoE layers of a model
MAX_GPUS = 8192  # GPUs (or CPU workers) of a cluster: plans and their arrays grow with the count
MAX_SEED = 2**63 - 1  # seeds key numpy generators and SeedSequences: non-negative, 64-bit
SHARE_TOLERANCE = 1e-6  # an expert's shares may miss 1 by this much (JSON round trip of float sums)

_FROZEN = dict(frozen=True, forbid_unknown_fields=True, kw_only=True)


class SpecError(ValueError):
    """Bad input: a config, load file or plan that cannot be used as given."""


class ModelSpec(msgspec.Struct, **_FROZEN):
    """The MoE part of a model: what the planner and memory model need."""

    name: str
    num_layers: int  # MoE layers only (dense layers excluded)
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    activation: str = "silu"
    expert_dtype: str = "bf16"
    source: str = ""  # where the numbers come from (HF config)

    def __post_init__(self) -> None:
        for key, most in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS), ("top_k", MAX_EXPERTS),
                          ("hidden_size", MAX_WIDTH), ("moe_intermediate_size", MAX_WIDTH)):
            if getattr(self, key) < 1:
                raise SpecError(f"model {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
            if getattr(self, key) > most:
                raise SpecError(f"model {self.name!r}: {key} must be <= {most}, got {getattr(self, key)}")
        if not 0 <= self.num_shared_experts <= MAX_EXPERTS:
            raise SpecError(f"model {self.name!r}: num_shared_experts must be in [0, {MAX_EXPERTS}], got "
                            f"{self.num_shared_experts}")
        if self.top_k > self.num_experts:
            raise SpecError(
                f"model {self.name!r}: top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )


class ClusterSpec(msgspec.Struct, **_FROZEN):
    """GPUs and links; `expert_memory_budget` is bytes per GPU for routed experts of one layer."""

    name: str
    nodes: int
    gpus_per_node: int
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 FLOP/s per GPU
    intra_node_bytes_per_s: float  # per GPU, one direction
    inter_node_bytes_per_s: float  # per GPU, one direction
    # fixed cost of one collective whatever its size (docs/runtime.md, "Latency in the cost model"): within one node, across nodes
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 25e-6
    expert_memory_budget: int | Literal["plain-ep"] = "plain-ep"
    device: str = "gpu"  # "gpu" (NCCL) or "cpu" (gloo workers)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise SpecError(f"cluster {self.name!r}: nodes and gpus_per_node must be >= 1")
        if self.nodes * self.gpus_per_node > MAX_GPUS:
            raise SpecError(f"cluster {self.name!r}: {self.nodes} nodes x {self.gpus_per_node} GPUs is more than "
                            f"{MAX_GPUS} GPUs")
        for key in ("hbm_bytes_per_s", "peak_flops", "intra_node_bytes_per_s", "inter_node_bytes_per_s"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise SpecError(f"cluster {self.name!r}: {key} must be a positive number, got {value}")
        for key in ("intra_node_latency_s", "inter_node_latency_s"):
            value = getattr(self, key)
            if not (0 <= value < 1):
                raise SpecError(f"cluster {self.name!r}: {key} must be in [0, 1) seconds, got {value}")
        if isinstance(self.expert_memory_budget, int) and self.expert_memory_budget <= 0:
            raise SpecError(f"cluster {self.name!r}: expert_memory_budget must be > 0 bytes")

    @property
    def num_gpus(self) -> int:
        """Total GPUs (or CPU workers) in the cluster."""
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu: int) -> int:
        """Node index of a global GPU index."""
        return gpu // self.gpus_per_node


class PlanOptions(msgspec.Struct, **_FROZEN):
    """Planner knobs. `quality_budget`: the largest fraction of routed tokens on quantized copies."""

    formats: tuple[Fmt, ...] = ("bf16", "int8")
    quality_budget: float = 0.25
    max_copies: int = 0  # 0: bounded only by the GPU count
    memory_budget: int | None = None  # bytes per GPU; None: the cluster's budget
    refine: bool = False  # exact HiGHS refine of the placement
    refine_time_limit: float = 1.0  # seconds per layer
    affinity_weight: float = 0.0  # > 0 uses co-activation stats when present
    hedge: bool = True  # even out single-copy experts per GPU, then spare int8/int4 copies from the unused quality budget
    seed: int = 0

    def __post_init__(self) -> None:
        if "bf16" not in self.formats:
            raise SpecError(f"options.formats must include bf16, got {list(self.formats)}")
        if len(set(self.formats)) != len(self.formats):
            raise SpecError(f"options.formats has duplicates: {list(self.formats)}")
        if not (0.0 <= self.quality_budget <= 1.0):
            raise SpecError(f"options.quality_budget must be in [0, 1], got {self.quality_budget}")
        if self.max_copies < 0:
            raise SpecError(f"options.max_copies must be >= 0, got {self.max_copies}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise SpecError(f"options.memory_budget must be > 0 bytes, got {self.memory_budget}")
        if self.refine_time_limit <= 0:
            raise SpecError("options.refine_time_limit must be > 0 seconds")
        if self.affinity_weight < 0:
            raise SpecError("options.affinity_weight must be >= 0")


class LoadStats(msgspec.Struct, **_FROZEN):
    """Per-layer expert token counts, the JSON format of shared/data/expert-loads (+ optional stats)."""

    counts: list[list[int]]  # [L][E] (token, expert) assignments
    num_experts: int
    top_k: int
    layer_ids: list[int] | None = None  # decoder layer index of each row of counts
    num_layers: int | None = None
    model: str = ""
    importance: list[list[float]] | None = None  # [L][E], e.g. loss change when removed
    sensitivity: list[list[dict[str, float]]] | None = None  # [L][E]{fmt: relative error}
    coactivation: list[list[list[int]]] | None = None  # [L-1][E][E] layer l -> l+1
    gate_mass: list[list[float]] | None = None  # [L][E] summed router weights
    source_repo: str = ""
    source_path: str = ""
    source_commit: str = ""
    license: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        _check_load_stats(self)

    @property
    def layers(self) -> list[int]:
        """Decoder layer ids (0..L-1 when the file does not say)."""
        return list(self.layer_ids) if self.layer_ids is not None else list(range(len(self.counts)))


class Slot(msgspec.Struct, **_FROZEN, gc=False):  # scalars only: no cycles; ~17k per plan
    """One physical expert copy: which GPU, which logical expert, its format and planned share."""

    gpu: int
    expert: int
    fmt: Fmt
    share: float


class LayerPlan(msgspec.Struct, **_FROZEN):
    """Slots of one MoE layer, ordered by (gpu, local index)."""

    layer: int
    slots: list[Slot]


class Plan(msgspec.Struct, **_FROZEN):
    """Planner output and runtime input; EPLB arrays are derived on load (see planner.arrays)."""

    model: ModelSpec
    cluster: ClusterSpec
    options: PlanOptions
    layers: list[LayerPlan]
    summary: dict[str, Any] = {}


def _check_load_stats(stats: LoadStats) -> None:
    """Validate shapes and values; raise SpecError naming the key and the offending index."""
    if not stats.counts:
        raise SpecError("counts: empty, expected [layers][experts] token counts")
    if not 1 <= stats.num_experts <= MAX_EXPERTS:
        raise SpecError(f"num_experts: must be in [1, {MAX_EXPERTS}], got {stats.num_experts}")
    if stats.top_k < 1 or stats.top_k > stats.num_experts:
        raise SpecError(f"top_k: must be in [1, num_experts={stats.num_experts}], got {stats.top_k}")
    for i, row in enumerate(stats.counts):
        if len(row) != stats.num_experts:
            raise SpecError(f"counts[{i}]: has {len(row)} experts, expected num_experts={stats.num_experts}")
        for e, c in enumerate(row):
            if not 0 <= c <= MAX_COUNT:
                raise SpecError(f"counts[{i}][{e}]: {c} is not a token count in [0, 2**48]")
    n_layers = len(stats.counts)
    if stats.layer_ids is not None:
        if len(stats.layer_ids) != n_layers:
            raise SpecError(f"layer_ids: has {len(stats.layer_ids)} entries, counts has {n_layers} layers")
        for i, (before, layer_id) in enumerate(zip([-1, *stats.layer_ids], stats.layer_ids)):
            if layer_id <= before:
                raise SpecError(f"layer_ids[{i}]: {layer_id}, expected increasing decoder layer ids >= 0")
    if stats.num_layers is not None and stats.num_layers != n_layers:
        raise SpecError(f"num_layers: says {stats.num_layers}, counts has {n_layers} layers")
    for key in ("importance", "gate_mass"):
        table = getattr(stats, key)
        if table is None:
            continue
        if len(table) != n_layers:
            raise SpecError(f"{key}: has {len(table)} layers, counts has {n_layers}")
        for i, row in enumerate(table):
            if len(row) != stats.num_experts:
                raise SpecError(f"{key}[{i}]: has {len(row)} experts, expected {stats.num_experts}")
            for e, v in enumerate(row):
                if not math.isfinite(v):
                    raise SpecError(f"{key}[{i}][{e}]: not a finite number ({v})")
    if stats.sensitivity is not None:
        if len(stats.sensitivity) != n_layers:
            raise SpecError(f"sensitivity: has {len(stats.sensitivity)} layers, counts has {n_layers}")
        for i, row in enumerate(stats.sensitivity):
            if len(row) != stats.num_experts:
                raise SpecError(f"sensitivity[{i}]: has {len(row)} experts, expected {stats.num_experts}")
            for e, by_fmt in enumerate(row):
                for fmt, v in by_fmt.items():
                    if fmt not in FORMATS:
                        raise SpecError(f"sensitivity[{i}][{e}]: unknown format {fmt!r}, expected one of {FORMATS}")
                    if not (math.isfinite(v) and v >= 0):
                        raise SpecError(f"sensitivity[{i}][{e}][{fmt!r}]: expected a finite number >= 0, got {v}")
    if stats.coactivation is not None:
        if len(stats.coactivation) != max(n_layers - 1, 0):
            raise SpecError(f"coactivation: has {len(stats.coactivation)} layer pairs, expected {n_layers - 1}")
        for i, mat in enumerate(stats.coactivation):
            if len(mat) != stats.num_experts or any(len(r) != stats.num_experts for r in mat):
                raise SpecError(f"coactivation[{i}]: expected a {stats.num_experts}x{stats.num_experts} matrix")


S = TypeVar("S")


def _decode(path: Path, kind: type[S]) -> S:
    """Read TOML or JSON at `path` into `kind`; errors name the file and the key."""
    if not path.exists():
        raise SpecError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise SpecError(f"{path}: file is empty, expected a {kind.__name__}")
    try:
        if path.suffix == ".toml":
            return msgspec.toml.decode(raw, type=kind)
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as err:
        raise SpecError(f"{path}: {err}") from None
    except msgspec.DecodeError as err:
        kind_name = "TOML" if path.suffix == ".toml" else "JSON"
        hint = " (NaN and Infinity are not JSON numbers; counts must be integers >= 0)" if kind_name == "JSON" else ""
        raise SpecError(f"{path}: not valid {kind_name}: {err}{hint}") from None
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def _resolve(name_or_path: str, folder: str) -> Path:
    """A bare name means configs/<folder>/<name>.toml; anything else is a path."""
    path = Path(name_or_path)
    if path.suffix in (".toml", ".json") or path.exists():
        return path
    candidate = CONFIG_DIR / folder / f"{name_or_path}.toml"
    if not candidate.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / folder).glob("*.toml"))
        raise SpecError(f"unknown {folder[:-1]} {name_or_path!r}: expected a file path or one of {known}")
    return candidate


def load_model(name_or_path: str) -> ModelSpec:
    """ModelSpec from a shipped name (configs/models) or a TOML/JSON path."""
    return _decode(_resolve(name_or_path, "models"), ModelSpec)


def load_cluster(name_or_path: str) -> ClusterSpec:
    """ClusterSpec from a shipped name (configs/clusters) or a TOML/JSON path."""
    return _decode(_resolve(name_or_path, "clusters"), ClusterSpec)


def load_stats(path: str | Path, model: ModelSpec | None = None) -> LoadStats:
    """LoadStats from a JSON file; with `model`, check experts, top_k and layer count against it."""
    path = Path(path)
    stats = _decode(path, LoadStats)
    if model is not None:
        check_stats_match_model(stats, model, where=str(path))
    return stats


def check_stats_match_model(stats: LoadStats, model: ModelSpec, where: str = "loads") -> None:
    """Raise SpecError unless the load stats fit the model's shape."""
    if stats.num_experts != model.num_experts:
        raise SpecError(
            f"{where}: num_experts={stats.num_experts} but model {model.name!r} has {model.num_experts}"
        )
    if stats.top_k != model.top_k:
        raise SpecError(f"{where}: top_k={stats.top_k} but model {model.name!r} has top_k={model.top_k}")
    if len(stats.counts) > model.num_layers:
        raise SpecError(
            f"{where}: counts has {len(stats.counts)} layers but model {model.name!r} has {model.num_layers} MoE layers"
        )
    check_layer_ids(stats.layers, model, f"{where}: layer_ids")


def check_layer_ids(layer_ids: list[int], model: ModelSpec, where: str) -> None:
    """Raise SpecError unless every decoder layer id can be one of the model's (below 2 x its MoE layers)."""
    limit = DECODER_LAYERS_PER_MOE_LAYER * model.num_layers
    for i, layer_id in enumerate(layer_ids):
        if not 0 <= layer_id < limit:
            raise SpecError(
                f"{where}[{i}]: {layer_id} is not a decoder layer of model {model.name!r} ({model.num_layers} MoE "
                f"layers): expected an id in [0, {limit})"
            )


def check_routed(stats: LoadStats, where: str) -> None:
    """Raise SpecError if a layer routed no token at all (nothing to plan or score on)."""
    for i, row in enumerate(stats.counts):
        if not any(row):
            raise SpecError(f"{where}: counts[{i}]: every count is 0, expected at least one routed token per layer")


def load_plan(path: str | Path) -> Plan:
    """Plan from its JSON file."""
    return _decode(Path(path), Plan)


def check_plan(plan: Plan, where: str = "plan") -> None:
    """Raise SpecError unless every layer is one the planner could have made: slots by GPU, every GPU in range and
    within the budget, every expert known, copied once per GPU at most, its shares >= 0 and summing to 1."""
    from rnq_ep.memory import expert_bytes, gpu_budget  # memory reads these specs: imported here, not at the top

    model, num_gpus = plan.model, plan.cluster.num_gpus
    budget = gpu_budget(model, plan.cluster, plan.options)
    bytes_of = {fmt: expert_bytes(model, fmt) for fmt in FORMATS}
    check_layer_ids([layer.layer for layer in plan.layers], model, f"{where}: layer ids")
    for i, layer in enumerate(plan.layers):
        at = f"{where}: layers[{i}] (layer {layer.layer})"
        if i and layer.layer <= plan.layers[i - 1].layer:
            raise SpecError(f"{at}: layer ids must increase, got {plan.layers[i - 1].layer} then {layer.layer}")
        held, shares, placed = [0] * num_gpus, [0.0] * model.num_experts, set()
        for j, slot in enumerate(layer.slots):
            if not 0 <= slot.gpu < num_gpus:
                raise SpecError(f"{at}.slots[{j}]: gpu {slot.gpu} out of range, the cluster has {num_gpus} GPUs")
            if not 0 <= slot.expert < model.num_experts:
                raise SpecError(f"{at}.slots[{j}]: unknown expert {slot.expert}, the model has {model.num_experts}")
            if j and slot.gpu < layer.slots[j - 1].gpu:
                raise SpecError(f"{at}.slots[{j}]: gpu {slot.gpu} after gpu {layer.slots[j - 1].gpu}, expected slots by gpu")
            if (slot.gpu, slot.expert) in placed:
                raise SpecError(f"{at}.slots[{j}]: a second copy of expert {slot.expert} on gpu {slot.gpu}")
            if not (math.isfinite(slot.share) and slot.share >= 0):
                raise SpecError(f"{at}.slots[{j}]: share {slot.share}, expected a finite number >= 0")
            placed.add((slot.gpu, slot.expert))
            held[slot.gpu] += bytes_of[slot.fmt]
            shares[slot.expert] += slot.share
        copied = {expert for _, expert in placed}
        for expert, total in enumerate(shares):
            if expert not in copied:
                raise SpecError(f"{at}: expert {expert} has no copy")
            if abs(total - 1.0) > SHARE_TOLERANCE:
                raise SpecError(f"{at}: the shares of expert {expert}'s copies sum to {total:.6g}, expected 1")
        worst = max(range(num_gpus), key=held.__getitem__)
        if held[worst] > budget:
            raise SpecError(f"{at}: gpu {worst} holds {held[worst]} expert bytes, over the plan's budget of {budget}")


def encode_json(obj: Any) -> bytes:
    """Deterministic, human-readable JSON for plans and stats."""
    return msgspec.json.format(msgspec.json.encode(obj), indent=1)


def write_atomic(path: str | Path, payload: bytes) -> None:
    """Write `payload` to `path` via a temp file + rename, so a failure leaves no partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


def stats_to_dict(stats: LoadStats) -> dict[str, Any]:
    """LoadStats as a plain dict (None fields dropped), for JSON output."""
    return {k: v for k, v in msgspec.to_builtins(stats).items() if v is not None}

