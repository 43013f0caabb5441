import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys

    class RefuseTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, RefuseTriton())
    import torch

    import patterns
    from patterns import PersistentLocal, VideoGeometry
    from patterns.fused_select import _triton_importable

    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton"
    assert not _triton_importable()
    # a CPU selection runs the torch path end to end
    g = VideoGeometry(8, frames_per_chunk=1, page_size=8, q_block=8)
    view = patterns.CacheView(
        geometry=g, num_heads=2, chunk_start=2, history_frames=(0, 1),
        frame_index=torch.tensor([0, 1]), frame_pages=torch.tensor([[[[1], [2]]]]),
        chunk_pages=torch.tensor([[[[0]]]]), persistent_pages=torch.zeros(1, 1, 0).long(),
        page_lens=torch.full((1, 1, 3), 8, dtype=torch.int32), key_reps=torch.randn(1, 1, 3, 4),
        query_reps=torch.randn(1, 2, 1, 4),
    )
    table = PersistentLocal(0, 3, local_topk=2, force_own_frame=False).select(view)
    assert table.kv_num_blocks.tolist() == [[[2], [2]]], table.kv_num_blocks
    print("ok")
    """
)


def test_patterns_imports_and_selects_without_triton():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
