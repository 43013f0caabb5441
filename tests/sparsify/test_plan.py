"""The Plan table and the `sparsify plan` command."""

from __future__ import annotations

import json

import pytest

from sparsify.cli import main
from sparsify.plan import KEPT, REWRITTEN, Plan, PlanRow


def _row(site: int, kind: str, decision: str, reason: str) -> PlanRow:
    rewritten = decision == REWRITTEN
    return PlanRow(
        site=site, kind=kind, layer=site // 2, module_path=f"blocks.{site // 2}.{kind}_attn",
        form="sdpa", op="aten::scaled_dot_product_attention", layout="BHLD",
        q_shape=(1, 192, 4, 16), k_shape=(1, 192 if kind == "self" else 8, 2, 16),
        v_shape=(1, 192 if kind == "self" else 8, 2, 16), decision=decision, reason=reason,
        backend="torch" if rewritten else None, q_block=128 if rewritten else None,
        page_size=64 if rewritten else None,
    )  # fmt: skip


def test_plan_table_has_one_row_per_site():
    rows = [
        _row(0, "self", REWRITTEN, "-> AttentionState[0]"),
        _row(1, "cross", KEPT, "cross-attention"),
        _row(2, "self", KEPT, "has an arbitrary dense attn_mask"),
    ]
    plan = Plan(rows, "dynamo", "cached", "Dense()", "T=64", [("torch.export", "boom")])
    lines = str(plan).splitlines()
    assert "captured by dynamo (after torch.export failed: boom)" in lines[0]
    assert "3 attention sites: 1 rewritten, 2 kept" in lines[2]
    header, body = lines[3], lines[4:]
    for column in ("kind", "layer", "q", "k", "v", "decision", "reason", "backend", "q_block/page"):
        assert column in header.split()
    assert len(body) == 3
    assert body[0].split()[:3] == ["0", "self", "0"] and "1x192x4x16" in body[0]
    assert "128/64" in body[0] and "torch" in body[0]
    assert "1x8x2x16" in body[1] and body[1].rstrip().endswith("cross-attention")
    assert "kept" in body[2] and "attn_mask" in body[2]
    assert [r.site for r in plan.rewritten] == [0] and [r.site for r in plan.kept] == [1, 2]
    assert plan.to_dict()["rows"][2]["reason"] == "has an arbitrary dense attn_mask"


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["plan", "--preset", "tiny", "--attn-impl", "unfused"], "blocks.1.self_attn.attn"),
        (["plan", "--diffusers-wan", "tiny"], "blocks.1.attn1"),
    ],
)
def test_plan_command(argv, module, capsys):
    if "--diffusers-wan" in argv:
        pytest.importorskip("diffusers")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 attention sites: 2 rewritten, 2 kept" in out
    assert any(module in line and "rewritten" in line for line in out.splitlines())


def test_plan_command_json_with_persistent_local(capsys):
    argv = ["plan", "--preset", "tiny", "--persistent-blocks", "2", "--local-topk", "1", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["pattern"].startswith("PersistentLocal(persistent_blocks=2")
    assert [r["decision"] for r in plan["rows"]] == ["rewritten", "kept", "rewritten", "kept"]
