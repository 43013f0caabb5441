"""Self vs cross by data flow, module-path confirmation, and the reasons to keep a site dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.capture import capture
from sparsify.classify import CROSS, SELF, classify, keep_reason, kind_from_path
from sparsify.sites import find_sites


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("blocks.0.self_attn.attn", SELF),
        ("blocks.0.cross_attn.attn", CROSS),
        ("blocks.3.attn1", SELF),
        ("blocks.3.attn2", CROSS),
        ("transformer.layers.2.attention", None),
        (None, None),
    ],
)
def test_kind_from_path(path, kind):
    assert kind_from_path(path) == kind


def _verdicts(model, inputs):
    gm = capture(model, inputs).graph_module
    sites = find_sites(gm)
    return sites, [classify(s, sites, gm) for s in sites]


class Stacked(nn.Module):
    """Two self/cross blocks: the second cross-attention's queries depend on the context
    through the first one, which must not make it self-attention."""

    def __init__(self, make):
        super().__init__()
        self.blocks = nn.ModuleList([make("sdpa_positional"), make("sdpa_positional")])

    def forward(self, x, context):
        for block in self.blocks:
            x = block(x, context)
        return x


def test_data_flow_in_depth(two_stream, inputs):
    sites, verdicts = _verdicts(Stacked(two_stream), inputs())
    assert [v.kind for v in verdicts] == [SELF, CROSS, SELF, CROSS]
    assert [s.layer for s in sites] == [0, 0, 1, 1]
    assert all(v.conflict is None for v in verdicts)


def test_unhinted_names_use_data_flow_only(two_stream, inputs):
    _, verdicts = _verdicts(two_stream("sdpa_positional", names=("mix", "text")), inputs())
    assert [(v.kind, v.by_module_path) for v in verdicts] == [(SELF, None), (CROSS, None)]


def test_disagreeing_module_path_keeps_the_site_dense(two_stream, inputs):
    sites, verdicts = _verdicts(two_stream("sdpa_positional", names=("cross", "self")), inputs())
    assert [v.kind for v in verdicts] == [SELF, CROSS]
    assert [v.by_module_path for v in verdicts] == [CROSS, SELF]
    for site, verdict in zip(sites, verdicts, strict=True):
        reason = keep_reason(site, verdict)
        assert "data flow says" in reason and "module path" in reason


class Variants(nn.Module):
    """Self-attention (q, k, v from x) with a dense mask, causal, dropout, and joint keys."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.ctx = nn.Linear(32, 64)

    def forward(self, x, context, mask):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, 16).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        kc, vc = (t.view(b, -1, 2, 16).transpose(1, 2) for t in self.ctx(context).chunk(2, -1))
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        joint = F.scaled_dot_product_attention(
            q, torch.cat([k, kc], dim=2), torch.cat([v, vc], dim=2)
        )
        plain = F.scaled_dot_product_attention(q, k, v)
        return masked + causal + dropped + joint + plain


def test_reasons_to_keep_self_attention_dense():
    x, context = torch.randn(1, 12, 32), torch.randn(1, 5, 32)
    mask = torch.rand(12, 12) > 0.5
    sites, verdicts = _verdicts(Variants(), (x, context, mask))
    assert [v.kind for v in verdicts] == [SELF] * 5
    reasons = [keep_reason(s, v) for s, v in zip(sites, verdicts, strict=True)]
    assert "attn_mask" in reasons[0]
    assert "is_causal" in reasons[1]
    assert "dropout" in reasons[2]
    assert "17 keys for 12 queries" in reasons[3]
    assert reasons[4] is None
