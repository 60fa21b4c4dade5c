"""SGMV / BGMV CUDA kernels and the CUDA pool against the CPU ops (skipped without a GPU)."""
import pytest
import torch

from conftest import assert_close
from lora_helpers import POPULARITY, make_pool, random_adapter, token_slots
from lorax_core.ops import bgmv, sgmv

pytestmark = pytest.mark.cuda

# Llama / Mistral / Qwen projection shapes (in, out) in one pool.
MODULES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336),
           "down_proj": (14336, 4096), "llama_down": (11008, 4096), "o_70b": (8192, 8192)}
RANKS = [[8], [16], [64], [1, 128], [4, 32]]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16, torch.float16], ids=str)
def pools(request):
    dtype = request.param
    gen = torch.Generator().manual_seed(0)
    cpu = make_pool(MODULES, num_layers=1, budget_pages=20000, page_size=1024, dtype=dtype)
    gpu = make_pool(MODULES, num_layers=1, budget_pages=20000, page_size=1024, dtype=dtype, device="cuda")
    for i, ranks in enumerate(RANKS):
        weights = random_adapter(MODULES, ranks, num_layers=1, gen=gen)
        assert cpu.load(f"a{i}", weights, 0.5 + i) == gpu.load(f"a{i}", weights, 0.5 + i)
        gpu.wait(f"a{i}")
    assert not cpu.evictions and not gpu.evictions
    return cpu, gpu, dtype


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("module", ["q_proj", "k_proj", "gate_proj", "down_proj", "llama_down", "o_70b"])
def test_bgmv_cuda_equals_cpu(pools, popularity, module):
    cpu, gpu, dtype = pools
    n_in, n_out = MODULES[module]
    slots = torch.tensor(token_slots(33, list(range(len(RANKS))), popularity, base_every=5), dtype=torch.int32)
    x, y = torch.randn(33, n_in).to(dtype), torch.randn(33, n_out).to(dtype)
    y_gpu = bgmv(y.cuda(), x.cuda(), gpu, 0, module, slots.cuda())
    y_cpu = bgmv(y.clone(), x, cpu, 0, module, slots)
    assert_close(y_gpu.cpu(), y_cpu, scale=4)


@pytest.mark.parametrize("lengths", [[512], [300, 0, 212], [1, 2, 3, 700], [64] * 8, [2100, 5]])
def test_sgmv_cuda_equals_cpu(pools, lengths):
    cpu, gpu, dtype = pools
    seg = torch.tensor([i % len(RANKS) - (i == 2) * 10 for i in range(len(lengths))], dtype=torch.int32).clamp(-1)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x, y = torch.randn(sum(lengths), 4096).to(dtype), torch.randn(sum(lengths), 1024).to(dtype)
    y_gpu = sgmv(y.cuda(), x.cuda(), gpu, 0, "k_proj", starts.cuda(), seg.cuda())
    y_cpu = sgmv(y.clone(), x, cpu, 0, "k_proj", starts, seg)
    assert_close(y_gpu.cpu(), y_cpu, scale=4)


@pytest.mark.parametrize("count", [40, 100])
def test_sgmv_cuda_many_segments(pools, count):
    """More segments than find_tile's warp walks in one step, empty and multi-tile ones among them."""
    cpu, gpu, dtype = pools
    lengths = [(0, 3, 1, 17, 2, 40, 5)[i % 7] for i in range(count)]
    seg = torch.tensor([i % (len(RANKS) + 1) - 1 for i in range(count)], dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x, y = torch.randn(sum(lengths), 4096).to(dtype), torch.randn(sum(lengths), 1024).to(dtype)
    y_gpu = sgmv(y.cuda(), x.cuda(), gpu, 0, "k_proj", starts.cuda(), seg.cuda())
    assert_close(y_gpu.cpu(), sgmv(y.clone(), x, cpu, 0, "k_proj", starts, seg), scale=4)


def test_sgmv_cuda_clamps_bad_segments(pools):
    """The CPU op refuses segments past the rows or adapters outside the pool; CUDA clamps them (no check that would
    wait for the GPU): the rows past the call are never touched and the adapter counts as none."""
    cpu, gpu, dtype = pools
    x, y = torch.randn(9, 4096).to(dtype), torch.randn(9, 1024).to(dtype)
    seg = torch.tensor([1, 3, 99, 0], dtype=torch.int32)
    expected = sgmv(y.clone(), x, cpu, 0, "k_proj", torch.tensor([0, 4, 9], dtype=torch.int32), seg[:2])
    bad = torch.tensor([0, 4, 40, 50, 60], dtype=torch.int32)
    assert_close(sgmv(y.cuda(), x.cuda(), gpu, 0, "k_proj", bad.cuda(), seg.cuda()).cpu(), expected, scale=4)


@pytest.mark.parametrize("tokens", [1, 64, 65, 300])
def test_bgmv_cuda_token_counts(pools, tokens):
    """One token (decode of one sequence) up to several tiles per adapter and two rank rows per warp (> 64)."""
    cpu, gpu, dtype = pools
    slots = torch.tensor(token_slots(tokens, list(range(len(RANKS))), "skewed", base_every=7), dtype=torch.int32)
    x, y = torch.randn(tokens, 4096).to(dtype), torch.randn(tokens, 14336).to(dtype)
    y_gpu = bgmv(y.cuda(), x.cuda(), gpu, 0, "gate_proj", slots.cuda())
    assert_close(y_gpu.cpu(), bgmv(y.clone(), x, cpu, 0, "gate_proj", slots), scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_cuda_odd_shapes_and_column_slices(dtype):
    """Shapes that do not fill 16-byte loads (scalar path), tiny pages, and y as a column slice of a wider tensor."""
    modules = {"odd": (100, 52), "even": (64, 48)}
    gen = torch.Generator().manual_seed(3)
    cpu = make_pool(modules, num_layers=1, page_size=16, dtype=dtype)
    gpu = make_pool(modules, num_layers=1, page_size=16, dtype=dtype, device="cuda")
    for i, ranks in enumerate([[3], [1, 5], [16]]):
        weights = random_adapter(modules, ranks, num_layers=1, gen=gen)
        cpu.load(f"a{i}", weights, 1.5)
        gpu.load(f"a{i}", weights, 1.5)
        gpu.wait(f"a{i}")
    for module, (n_in, n_out) in modules.items():
        slots = torch.tensor(token_slots(40, [0, 1, 2], "uniform", base_every=6), dtype=torch.int32)
        x, fused = torch.randn(40, n_in).to(dtype), torch.randn(40, n_out + 9).to(dtype)
        expected = fused.clone()
        bgmv(expected[:, 1:1 + n_out], x, cpu, 0, module, slots)
        y_gpu = fused.cuda()
        bgmv(y_gpu[:, 1:1 + n_out], x.cuda(), gpu, 0, module, slots.cuda())
        assert_close(y_gpu.cpu(), expected, scale=4)
        starts, seg = torch.tensor([0, 17, 17, 40], dtype=torch.int32), torch.tensor([2, 0, -1], dtype=torch.int32)
        expected = fused.clone()
        sgmv(expected[:, :n_out], x, cpu, 0, module, starts, seg)
        y_gpu = fused.cuda()
        sgmv(y_gpu[:, :n_out], x.cuda(), gpu, 0, module, starts.cuda(), seg.cuda())
        assert_close(y_gpu.cpu(), expected, scale=4)


def test_bgmv_cuda_writes_every_element_of_v(pools):
    """v comes from torch.empty: rows without an adapter, and columns past an adapter's rank, must still be zero."""
    cpu, gpu, dtype = pools
    slots = torch.tensor([0, -1, 3, 1, -1, 4, 2], dtype=torch.int32)
    x = torch.randn(7, 4096).to(dtype)
    common_gpu, common_cpu = (gpu.arena, gpu.page_table, gpu.ranks), (cpu.arena, cpu.page_table, cpu.ranks)
    m = gpu.module_index("q_proj")
    garbage = torch.full((7, gpu.page_table.shape[4]), float("nan"), device="cuda")
    del garbage  # the allocator hands this block to v next
    v_gpu = torch.ops.lorax_core.bgmv_shrink(x.cuda(), *common_gpu, slots.cuda(), 0, [m], gpu.page_size)
    v_cpu = torch.ops.lorax_core.bgmv_shrink(x, *common_cpu, slots, 0, [m], cpu.page_size)
    assert_close(v_gpu.cpu(), v_cpu, dtype=dtype, scale=4)


def test_cuda_pool_reads_back_and_evicts(pools):
    cpu, gpu, dtype = pools
    a, b = gpu.dense("a3", 0, "gate_proj")
    ca, cb = cpu.dense("a3", 0, "gate_proj")
    assert torch.equal(a.cpu(), ca) and torch.equal(b.cpu(), cb)


def test_opcheck_cuda(pools):
    cpu, gpu, dtype = pools
    x, y = torch.randn(6, 4096, device="cuda").to(dtype), torch.randn(6, 1024, device="cuda").to(dtype)
    slots = torch.tensor([0, -1, 3, 3, 1, 4], dtype=torch.int32, device="cuda")
    common = (gpu.arena, gpu.page_table, gpu.ranks)
    m = gpu.module_index("k_proj")
    v = torch.ops.lorax_core.bgmv_shrink(x, *common, slots, 0, [m], gpu.page_size)
    torch.library.opcheck(torch.ops.lorax_core.bgmv_shrink.default, (x, *common, slots, 0, [m], gpu.page_size))
    torch.library.opcheck(torch.ops.lorax_core.bgmv_expand.default,
                          (y, v, *common, gpu.scales, slots, 0, [m], [0, 1024], gpu.page_size))
    torch.library.opcheck(torch.ops.lorax_core.bgmv.default,
                          (y, x, *common, gpu.scales, slots, 0, [m], [0, 1024], gpu.page_size))
    starts, seg = torch.tensor([0, 2, 6], dtype=torch.int32, device="cuda"), slots[:2].clone()
    torch.library.opcheck(torch.ops.lorax_core.sgmv.default,
                          (y, x, *common, gpu.scales, starts, seg, 0, [m], [0, 1024], gpu.page_size))


@pytest.mark.parametrize("tokens", [1, 5, 33, 300])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_fused_modules_cuda_equal_cpu(pools, tokens, popularity):
    """q | k | v of a fused projection in one call (three modules, outputs side by side), SGMV and BGMV."""
    cpu, gpu, dtype = pools
    names = ["q_proj", "k_proj", "k_proj"]  # k twice stands in for v: same shape, a second column block
    slots = torch.tensor(token_slots(tokens, list(range(len(RANKS))), popularity, base_every=5), dtype=torch.int32)
    x, y = torch.randn(tokens, 4096).to(dtype), torch.randn(tokens, 4096 + 2 * 1024).to(dtype)
    expected = bgmv(y.clone(), x, cpu, 0, names, slots)
    assert_close(bgmv(y.cuda(), x.cuda(), gpu, 0, names, slots.cuda()).cpu(), expected, scale=4)
    order = torch.argsort(slots, stable=True)  # SGMV: rows grouped by adapter, one segment per adapter
    seg, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    expected = sgmv(y[order].clone(), x[order], cpu, 0, names, starts, seg)
    got = sgmv(y[order].cuda(), x[order].cuda(), gpu, 0, names, starts.cuda(), seg.cuda())
    assert_close(got.cpu(), expected, scale=4)
