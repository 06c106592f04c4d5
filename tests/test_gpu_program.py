"""Reading a compiled GPU program (`bench.gpu_program`): which instructions are launches, of what
kind, inside the loop body or outside it, and which of them XLA replays as CUDA graphs. The program
and its thunk sequence are written here in the forms XLA prints and dumps them (`compiled.as_text()`,
`*.thunk_sequence_after_thunk_passes.txt`); compiling one needs the CUDA plugin, which the suite does
not install."""

from cifar_jax.bench.gpu_program import count_launches, estimate_ms, read_thunks, thunk_sequence

HLO = """\
HloModule jit_chunk, entry_computation_layout={(s32[])->s32[]}

%fused_convert (param_0: f32[3,3,64,64]) -> bf16[3,3,64,64] {
  %param_0 = f32[3,3,64,64]{3,2,1,0} parameter(0)
  ROOT %convert.1 = bf16[3,3,64,64]{3,2,1,0} convert(%param_0)
}

%body (arg: (s32[], bf16[8,4,4,64])) -> (s32[], bf16[8,4,4,64]) {
  %arg = (s32[], bf16[8,4,4,64]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = bf16[8,4,4,64]{3,2,1,0} get-tuple-element(%arg), index=1
  %loop_convert_fusion = bf16[3,3,64,64]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_convert
  %conv = (bf16[8,4,4,64], u8[0]) custom-call(%x), custom_call_target="__cudnn$convBiasActivationForward"
  %y = bf16[8,4,4,64]{3,2,1,0} get-tuple-element(%conv), index=0
  %input_reduce_fusion = f32[64]{0} fusion(%y), kind=kInput, calls=%fused_convert
  %loop_add_fusion = bf16[8,4,4,64]{3,2,1,0} fusion(%y, %y), kind=kLoop, calls=%fused_convert
  %gemm_fusion_dot = f32[8,100]{1,0} fusion(%y), kind=kCustom, calls=%fused_convert
  %copy.3 = bf16[8,4,4,64]{3,2,1,0} copy(%loop_add_fusion)
  %bitcast.1 = bf16[8,1024]{1,0} bitcast(%copy.3)
  ROOT %tuple = (s32[], bf16[8,4,4,64]{3,2,1,0}) tuple(%i, %copy.3)
}

%cond (arg: (s32[], bf16[8,4,4,64])) -> pred[] {
  %arg = (s32[], bf16[8,4,4,64]{3,2,1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (p: s32[]) -> s32[] {
  %p = s32[] parameter(0)
  %x0 = bf16[8,4,4,64]{3,2,1,0} constant({...})
  %loop_convert_fusion.2 = bf16[3,3,64,64]{3,2,1,0} fusion(%x0), kind=kLoop, calls=%fused_convert
  %t = (s32[], bf16[8,4,4,64]{3,2,1,0}) tuple(%p, %x0)
  %while = (s32[], bf16[8,4,4,64]{3,2,1,0}) while(%t), condition=%cond, body=%body
  %cublas = (f32[8,8]{1,0}, s8[4]{0}) custom-call(%p), custom_call_target="__cublas$gemm"
  ROOT %r = s32[] get-tuple-element(%while), index=0
}
"""


def test_launches_are_counted_by_kind_inside_and_outside_the_loop():
    launches = count_launches(HLO)
    assert dict(launches.in_loop) == {
        "convert fusion": 1,
        "cudnn convolution (bias+activation fused)": 1,
        "reduction fusion": 1,
        "elementwise fusion": 1,
        "triton gemm": 1,
        "copy/transpose": 1,
    }
    assert launches.per_iteration == 6  # parameters, tuples, get-tuple-element, bitcasts: no launch
    assert dict(launches.outside) == {"convert fusion": 1, "cublas gemm": 1}  # the while itself: none


def test_the_estimate_adds_launch_time_and_arithmetic():
    assert estimate_ms(0, 0, 1, 357.0) == 1.0  # 357 GFLOP at the fitted 357 TFLOP/s
    assert abs(estimate_ms(100, 20, 20, 0.0) - 101 * 3.8 / 1000) < 1e-12


# The shape of XLA's dump (jaxlib 0.10.2, abridged): the entry's thunks, a command buffer's thunks
# indented under it, the while's condition and body; in the body two graphs split by a convolution,
# then a convolution, a copy and a kernel alone.
THUNKS = """\
000: kCommandBuffer [source       | next=005 (1)]
    001: kCustomKernel [source       | sink        ] wrapped_transpose_1 grid: [4, 1, 1]
    002: kCustomKernel [source       | sink        ] loop_convert_fusion grid: [4, 1, 1]
003: kCopy         [source       | sink        ] kCopy
004: kCopy         [source       | sink        ] kCopy
005: kWhile         [prev=000 (1) | next=006 (1)]
condition:
    006: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
  body:
    000: kCommandBuffer [source         | next=010 (1)  ]
        007: kCustomKernel [source       | next=008 (1)] loop_add_fusion grid: [1, 1, 1]
        008: kCustomKernel [prev=007 (1) | next=009 (1)] input_reduce_fusion grid: [32, 1, 1]
        009: kCustomKernel [prev=008 (1) | sink        ] loop_convert_fusion_3 grid: [768, 1, 1]
    010: kConvolution   [prev=000 (1)   | next=000 (1)  ] kConvolution
    000: kCommandBuffer [prev=010 (1)   | next=013 (1)  ]
        011: kCustomKernel [source       | next=012 (1)] input_reduce_fusion_43 grid: [128, 1, 1]
        012: kCopy         [prev=011 (1) | sink        ] kCopy
    013: kConvolution   [prev=000 (1)   | next=014 (1)  ] kConvolution
    014: kCopy          [prev=013 (1)   | next=015 (1)  ] kCopy
    015: kCustomKernel  [prev=014 (1)   | sink          ] loop_maximum_fusion grid: [1000, 1, 1]
016: kCustomKernel [prev=005 (1) | sink        ] loop_add_select_fusion grid: [1, 1, 1]
"""


def test_host_launches_count_a_graph_once_and_each_thunk_outside_one():
    host = read_thunks(THUNKS)
    assert (host.graphs, host.in_graphs) == (2, 5)
    assert dict(host.alone) == {"kConvolution": 2, "kCopy": 1, "kCustomKernel": 1}
    assert host.per_iteration == 6  # 2 graphs + 4 alone; the condition's kernel is not the body's
    assert host.outside == 4  # the entry's graph, two copies, the kernel after the loop


def test_the_loop_is_the_while_with_the_longest_body():
    short_loop = "100: kWhile [source | sink]\ncondition:\n  body:\n    101: kCopy [source | sink] kCopy\n"
    host = read_thunks(short_loop + THUNKS)
    assert (host.graphs, sum(host.alone.values())) == (2, 4)
    assert read_thunks(THUNKS + short_loop).per_iteration == 6


def test_the_thunk_sequence_after_xlas_passes_is_read_where_there_is_one(tmp_path):
    (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text("before")
    assert thunk_sequence(tmp_path) == "before"  # no pass changed anything: no second file
    (tmp_path / "module_0001.jit_f.thunk_sequence_after_thunk_passes.txt").write_text("after")
    assert thunk_sequence(tmp_path) == "after"
