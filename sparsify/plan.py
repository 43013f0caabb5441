"""The plan: what the graph pass found and decided, one row per attention site."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REWRITTEN, KEPT = "rewritten", "kept"


@dataclass(frozen=True)
class PlanRow:
    """One attention site.

    kind: "self" or "cross" (by data flow, see `sparsify.classify`); q/k/v shapes are BLHD
    [B, L, H, D] as the attention state receives them (k/v with their Hkv heads); decision:
    "rewritten" or "kept"; reason: why it was kept (or what it was rewritten to).
    """

    site: int
    kind: str
    layer: int | None
    module_path: str | None
    form: str
    op: str
    layout: str
    q_shape: tuple[int, ...] | None
    k_shape: tuple[int, ...] | None
    v_shape: tuple[int, ...] | None
    decision: str
    reason: str
    backend: str | None = None
    q_block: int | None = None
    page_size: int | None = None


_COLUMNS = (
    ("site", lambda r: str(r.site)),
    ("kind", lambda r: r.kind),
    ("layer", lambda r: "-" if r.layer is None else str(r.layer)),
    ("module", lambda r: r.module_path or "-"),
    ("form", lambda r: r.form),
    ("layout", lambda r: r.layout),
    ("q", lambda r: _shape(r.q_shape)),
    ("k", lambda r: _shape(r.k_shape)),
    ("v", lambda r: _shape(r.v_shape)),
    ("decision", lambda r: r.decision),
    ("backend", lambda r: r.backend or "-"),
    ("q_block/page", lambda r: "-" if r.q_block is None else f"{r.q_block}/{r.page_size}"),
    ("reason", lambda r: r.reason),
)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "x".join(map(str, shape))


@dataclass
class Plan:
    """Every site with its decision, plus how the graph was captured and what it runs."""

    rows: list[PlanRow]
    capture: str
    mode: str
    pattern: str
    geometry: str
    capture_failures: list[tuple[str, str]] = field(default_factory=list)
    constants: dict[str, int] = field(default_factory=dict)  # int inputs specialised

    @property
    def rewritten(self) -> list[PlanRow]:
        return [r for r in self.rows if r.decision == REWRITTEN]

    @property
    def kept(self) -> list[PlanRow]:
        return [r for r in self.rows if r.decision == KEPT]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        header = [
            f"captured by {self.capture}"
            + "".join(f" (after {m} failed: {msg})" for m, msg in self.capture_failures)
            + "".join(f"; {name}={value} specialised" for name, value in self.constants.items()),
            f"mode {self.mode}; pattern {self.pattern}; geometry {self.geometry}",
            f"{len(self.rows)} attention sites: {len(self.rewritten)} rewritten, "
            f"{len(self.kept)} kept",
        ]
        cells = [[name for name, _ in _COLUMNS]]
        cells += [[cell(row) for _, cell in _COLUMNS] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
        table = [
            "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
            for line in cells
        ]
        return "\n".join(header + table)
