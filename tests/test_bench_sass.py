"""bench/sass_loops.py: it finds a function's loops in cuobjdump's SASS listing and counts their instructions."""
from bench_helpers import load_bench_script

SASS = """
	code for sm_90
		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                              /* 0x0000000000007919 */
        /*0020*/                   LDS R2, [R0] ;                                  /* 0x0000000000027984 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;           /* 0x0000000c0804723c */
        /*0040*/                   STL [R1], R2 ;                                  /* 0x0000000201007387 */
        /*0050*/              @!P0 BRA 0x20 ;                                      /* 0xfffffffc00008947 */
        /*0060*/                   LDG.E.128 R8, desc[UR4][R2.64] ;                /* 0x0000000402087981 */
        /*0070*/                   BRA 0x90 ;                                      /* 0x0000000000047947 */
        /*0080*/                   NOP ;                                           /* 0x0000000000007918 */
        /*0090*/                   EXIT ;                                          /* 0x000000000000794d */
		Function : _Z5otherv
        /*0000*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_loops_are_found_and_counted():
    module = load_bench_script("sass_loops")
    found = module.functions(SASS)
    assert list(found) == ["_Z6kernelPf", "_Z5otherv"] and len(found["_Z6kernelPf"]) == 10
    # one backward branch (0x50 -> 0x20); the forward BRA 0x90 is no loop
    assert module.loops(found["_Z6kernelPf"]) == [
        {"start": "0x20", "end": "0x50", "instructions": 4, "HMMA": 1, "LDS": 1, "LDG": 0, "spills": 1}]
