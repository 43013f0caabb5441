import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from patterns import Dense, PersistentLocal, SinkWindow, TopK, VideoGeometry
from patterns.footprint import PAGE_BYTES, Footprint, evaluate, t


def _simulate(pattern, frames_per_chunk, pages_per_frame, layers, chunks):
    """Page counts of the pool, step by step, in the runtime's commit order (see
    patterns.footprint): returns (held pages after each chunk, peak pages up to each chunk)."""
    f, p, c = frames_per_chunk, pages_per_frame, pattern.cache_policy.persistent_capacity
    held = [[] for _ in range(layers)]
    persistent = [0] * layers
    used = peak = f * p  # scratch
    helds, peaks = [], []
    for chunk in range(chunks):
        start = chunk * f
        new = list(range(start, start + f))
        retained = set(pattern.cache_policy.retained_frames(start + f, f))
        for layer in range(layers):
            evict_old = [fr for fr in held[layer] if fr not in retained]
            evict_new = [fr for fr in new if fr not in retained]
            candidates = persistent[layer] + p * len(evict_old)
            if c and evict_new:
                used += p * len(evict_new)
                peak = max(peak, used)
                candidates += p * len(evict_new)
            kept = min(c, candidates)
            used -= candidates - kept
            persistent[layer] = kept
            keep_new = [fr for fr in new if fr in retained]
            used += p * len(keep_new)
            peak = max(peak, used)
            held[layer] = [fr for fr in held[layer] if fr in retained] + keep_new
        helds.append(used)
        peaks.append(peak)
    return helds, peaks


patterns_strategy = st.one_of(
    st.builds(Dense, st.none() | st.integers(4, 12), st.just(0)),
    st.builds(Dense, st.integers(6, 12), st.integers(0, 2)),
    st.builds(SinkWindow, st.integers(0, 2), st.integers(6, 12)),
    st.builds(TopK, window_frames=st.none() | st.integers(5, 12), sink_frames=st.integers(0, 1)),
    st.builds(PersistentLocal, st.integers(0, 40), st.integers(3, 12), local_topk=st.none()),
)


@given(
    pattern=patterns_strategy,
    frames=st.integers(1, 3),
    ppf=st.integers(1, 5),
    layers=st.integers(1, 4),
)
def test_formulas_match_a_step_by_step_count_of_the_commit_order(pattern, frames, ppf, layers):
    geometry = VideoGeometry(ppf * 8, frames_per_chunk=frames, page_size=8)
    pattern.check_geometry(geometry)
    chunks = 8
    helds, peaks = _simulate(pattern, frames, ppf, layers, chunks)
    fp = pattern.footprint()
    for n in range(1, chunks + 1):
        assert evaluate(fp.held_pages(), geometry, num_layers=layers, chunks=n) == helds[n - 1]
        assert evaluate(fp.peak_pages(), geometry, num_layers=layers, chunks=n) == peaks[n - 1]
    bound = fp.peak_bound_pages()
    if bound is None:  # a global cache grows by one chunk per chunk
        assert pattern.window_frames is None
        assert peaks[-1] - peaks[-2] == layers * frames * ppf
    else:
        # long enough to fill the window and then the persistent set (>= 1 page per chunk)
        late_held, late_peaks = _simulate(pattern, frames, ppf, layers, 60)
        assert evaluate(bound, geometry, num_layers=layers) == late_peaks[-1]
        assert max(late_held) == late_held[-1]  # sizes never decrease


def test_wan_5s_numbers():
    g = VideoGeometry.wan_480p()
    dense = Dense().footprint()
    # 7 chunks: 21 frames · 13 pages in each of 30 layers, plus one chunk of scratch
    assert evaluate(dense.held_pages(), g, num_layers=30, chunks=7) == 30 * 21 * 13 + 39
    bytes_ = evaluate(
        dense.held_bytes(),
        g,
        num_layers=30,
        chunks=7,
        batch_size=1,
        kv_heads=12,
        dim=128,
        element_bytes=2,
    )
    assert bytes_ == (30 * 21 * 13 + 39) * 2 * 12 * 128 * 128 * 2
    sparse = PersistentLocal(persistent_blocks=32, window_frames=12).footprint()
    bound = sparse.peak_bound_pages()
    assert evaluate(bound, g, num_layers=30) == 30 * (9 * 13 + 32) + 39


def test_unbounded_and_bounded_patterns():
    assert Dense().footprint().peak_bound_pages() is None
    assert TopK().footprint().peak_bound_pages() is None
    assert Dense(window_frames=9).footprint().peak_bound_pages() is not None
    assert PersistentLocal(8, 6).footprint().peak_bound_bytes() is not None


def test_transient_appears_only_with_persistence_and_a_window_under_two_chunks():
    f = sp.Symbol("F", integer=True, positive=True)
    assert PersistentLocal(0, 4).footprint().transient_pages == 0
    transient = PersistentLocal(8, 4).footprint().transient_pages
    assert transient.subs(f, 3) != 0 and transient.subs(f, 2) == 0


def test_bytes_are_pages_times_page_bytes():
    fp = PersistentLocal(16, 9).footprint()
    assert sp.simplify(fp.peak_bytes() - fp.peak_pages() * PAGE_BYTES) == 0
    assert sp.simplify(fp.held_bytes() - fp.held_pages() * PAGE_BYTES) == 0


def test_evaluate_names_missing_symbols():
    g = VideoGeometry(64, page_size=16)
    with pytest.raises(ValueError, match="t"):
        evaluate(Dense().footprint().held_pages(), g, num_layers=2)
    with pytest.raises(ValueError, match="Hkv"):
        evaluate(Dense().footprint().held_bytes(), g, num_layers=2, chunks=1)


def test_str_shows_the_formula():
    text = str(Footprint(t * 2, sp.Integer(3)))
    assert "KV pages per layer" in text and "t" in text
