"""Reading a compiled GPU program (`bench.gpu_program`): which instructions are launches, of what
kind, inside the loop body or outside it. The program is written here in the form XLA prints it
(`compiled.as_text()`); compiling one needs the CUDA plugin, which the suite does not install."""

from cifar_jax.bench.gpu_program import count_launches, estimate_ms

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
