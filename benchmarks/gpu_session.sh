#!/usr/bin/env bash
# The GPU checks and timings still to run, as named steps, for the `device` tool's machine. A device
# call runs at most 10 minutes and a session has about 30 in all, on a fresh machine each time, so
# this is the list a session works down (in the order of `--list`), a few steps a call. A call's
# steps share its budget (GPU_SESSION_BUDGET, default 570 s, install included): each step runs at
# most its own limit or what is left, whichever is less, so list them in order of priority (a
# timing step against fla may need a call of its own: fla autotunes at its first call):
#
#   bash benchmarks/gpu_session.sh --list
#   bash benchmarks/gpu_session.sh kda_tree_checks gla_tree_checks      # through the device tool, carry [".whl"]
#
# It installs once (benchmarks/device.sh), seeds Triton's cache with the autotuning choices kept in
# benchmarks/autotune_sm90.tar.gz, runs each step under its own time limit (a step that runs past it
# is killed, and the next one runs), and writes a line per step in $OUT/steps.txt (exit status and
# seconds), $OUT/autotune.tar.gz, the choices it ends with (copy that over
# benchmarks/autotune_sm90.tar.gz), and $OUT/results.tar.gz holding STEP.log, STEP.json where the
# step writes one, the other .json / .log / .txt files a step writes at the top of $OUT, install.log
# and gpu.txt (the device tool brings back at most 8 files). Every figure taken from
# these goes into docs/benchmarks.md with its command (the step's line below, after
# `bash benchmarks/device.sh`).
set -uo pipefail
cd "$(dirname "$0")/.."

D512=(vars.d_model=512 vars.layers=4 vars.heads=8)
# name | seconds | command ($J: the step's JSON path)
steps() {
  cat <<'EOF'
kda_tree_checks|240|NLGRAPH_CHANNEL_TREE=1 python benchmarks/delta_rule_channel_kernel.py --checks 1 2 4 5 7 --no-timing --json $J
gla_tree_checks|200|NLGRAPH_CHANNEL_TREE=1 python benchmarks/linear_attention_kernel.py --channel --checks 2 5 --no-timing --json $J
channel_tree_session|550|NLGRAPH_CHANNEL_TREE=1 python benchmarks/delta_rule_channel_kernel.py --checks 1 2 4 5 7 --no-timing --json $OUT/kda_tree_checks.json && NLGRAPH_CHANNEL_TREE=1 python benchmarks/linear_attention_kernel.py --channel --checks 2 5 --no-timing --json $OUT/gla_tree_checks.json && NLGRAPH_CHANNEL_TREE=0 python benchmarks/delta_rule_channel_kernel.py --checks --no-fla --json $OUT/kda_offsets_nofla.json && NLGRAPH_CHANNEL_TREE=1 python benchmarks/delta_rule_channel_kernel.py --checks --no-fla --json $OUT/kda_tree_nofla.json && NLGRAPH_CHANNEL_TREE=0 python benchmarks/linear_attention_kernel.py --channel --checks --no-fla --json $OUT/gla_offsets_nofla.json && NLGRAPH_CHANNEL_TREE=1 python benchmarks/linear_attention_kernel.py --channel --checks --no-fla --json $J
gla_tree_nofla|120|NLGRAPH_CHANNEL_TREE=1 python benchmarks/linear_attention_kernel.py --channel --checks --no-fla --json $J
gla_tree_fla|400|python benchmarks/linear_attention_kernel.py --channel --checks --json $J
kda_tree_fla|300|python benchmarks/delta_rule_channel_kernel.py --checks --json $J
gla_profile_fla|450|python benchmarks/linear_attention_kernel.py --channel --checks --profile --json $J
kda_profile_fla|300|python benchmarks/delta_rule_channel_kernel.py --checks --profile --json $J
gla_all_fla|400|python benchmarks/linear_attention_kernel.py --channel --profile --json $J
la_scalar_fla|300|python benchmarks/linear_attention_kernel.py --json $J
kda_all_fla|300|python benchmarks/delta_rule_channel_kernel.py --profile --json $J
kda_all_fla_w8|300|python benchmarks/delta_rule_channel_kernel.py --profile --warps 8 --json $J
kda_timing|540|NLGRAPH_CHANNEL_TREE=0 python benchmarks/delta_rule_channel_kernel.py --checks --warps 8 --json $J
kda_tree_timing|540|NLGRAPH_CHANNEL_TREE=1 python benchmarks/delta_rule_channel_kernel.py --checks --warps 8 --json $J
gla_timing|420|NLGRAPH_CHANNEL_TREE=0 python benchmarks/linear_attention_kernel.py --channel --checks --warps 8 --json $J
gla_tree_timing|420|NLGRAPH_CHANNEL_TREE=1 python benchmarks/linear_attention_kernel.py --channel --checks --warps 8 --json $J
kda_warps8_checks|240|python benchmarks/delta_rule_channel_kernel.py --checks 4 5 7 --check-warps 8 --no-timing --json $J
gla_warps8_checks|200|python benchmarks/linear_attention_kernel.py --channel --checks 2 5 --check-warps 8 --no-timing --json $J
hope_compile_graph|360|python -P -m nlgraph bench hope D512 --lengths 2048 --tokens 4096 --modes compile-graph --steps 2 --anchor none --json $J
hope_large_chunk_t4096|420|python -P -m nlgraph bench hope_large_chunk D512 --lengths 4096 --batch 2 --modes compile-graph --steps 3 --json $J
hope_compile_cache|560|python benchmarks/compile_check.py hope_large_chunk --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 270 --trace-subprocesses --json $J
gdn_compile_cache|330|python benchmarks/compile_check.py gated_deltanet --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 160 --trace-subprocesses --json $J
gdn_compile_cache_no_precompile|330|NLGRAPH_TRITON_PRECOMPILE=0 python benchmarks/compile_check.py gated_deltanet --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 160 --trace-subprocesses --json $J
gdn_compile_cache_fp32|200|python benchmarks/compile_check.py gated_deltanet --cold --precision fp32 --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 120 --trace-subprocesses --json $J
hope_compile_cache_chunk16|330|python benchmarks/compile_check.py hope --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 2 --steps 2 --child-timeout 150 --trace-subprocesses --json $J
precompile_check|200|python benchmarks/compile_check.py titans retnet --d-model 256 --heads 4 --layers 2 --length 512 --batch 2 --steps 2 --trace-subprocesses --json $J
gdn_compile_cache_autotune|330|NLGRAPH_TRITON_AUTOTUNE=1 NLGRAPH_TRITON_PRECOMPILE=0 python benchmarks/compile_check.py gated_deltanet --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 160 --trace-subprocesses --json $J
gdn_compile_cache_host_cpp|330|python benchmarks/compile_check.py gated_deltanet --cold --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 160 --trace-subprocesses --host-cpp --json $J
hope_tf32|560|python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --json $OUT/hope_tf32_off.json && python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --tf32 --json $J
hope_large_chunk_b8|420|python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --json $J
hope_recompute_b4|480|python -P -m nlgraph bench hope D512 --lengths 2048 --batch 4 --modes compile --recompute-blocks --anchor none --json $J
mlp_split_checks|240|python benchmarks/mlp_memory_kernel.py --no-timing --checks 0 1 2 3 4 7 8 9 10 --splits 1 --json $J
mlp_split_timing|300|python benchmarks/mlp_memory_kernel.py --checks --shapes titans --no-pytorch --splits 0 1 2 --blocks 16 32 --warps 4 8 --json $J
mlp_split_profile|200|python benchmarks/mlp_memory_kernel.py --checks --shapes titans --profile --splits 0 1 --blocks 16 32 --warps 4 --json $J
titans_split_level|300|NLGRAPH_MLP_MEMORY_SPLIT=1 python -P -m nlgraph bench titans --level memory --heads 8 --dim 64 --batch 8 --lengths 2048 --json $J
titans_split_model|330|NLGRAPH_MLP_MEMORY_SPLIT=1 python -P -m nlgraph bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
titans_split_t4096|240|NLGRAPH_MLP_MEMORY_SPLIT=1 python -P -m nlgraph bench titans D512 --lengths 4096 --batch 4 --modes compile-graph --json $J
mlp_split_checks_w8|200|python benchmarks/mlp_memory_kernel.py --no-timing --checks 0 1 2 9 --splits 1 --check-warps 8 --json $J && python benchmarks/mlp_memory_kernel.py --no-timing --checks 0 1 --splits 1 --check-warps 8 --check-block 16 --json $OUT/mlp_split_checks_w8_b16.json
mlp_split_profile_warps|200|python benchmarks/mlp_memory_kernel.py --checks --shapes titans --profile --splits 1 --blocks 16 32 --warps 4 8 --json $J
titans_split_w8_model|240|python -P benchmarks/with_mlp_warps.py 8 32 bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
titans_split_w8b16_model|240|python -P benchmarks/with_mlp_warps.py 8 16 bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J
titans_nosplit_model|240|NLGRAPH_MLP_MEMORY_SPLIT=0 python -P -m nlgraph bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J
titans_large_chunk|480|python -P -m nlgraph bench titans D512 levels.memory.gradient_point.chunk=256 --lengths 2048 --tokens 16384 --modes compile-graph --json $J && python -P -m nlgraph bench titans D512 levels.memory.gradient_point.chunk=512 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $OUT/titans_chunk512.json
deltanet_model|360|python -P -m nlgraph bench deltanet D512 --lengths 2048 4096 --tokens 16384 --modes compile-graph --json $J
value_beta_check|330|python benchmarks/kernels.py --value-beta --skip-fla --skip-nlgraph-chunked --out $J && python benchmarks/kernels.py --skip-fla --skip-nlgraph-chunked --out $OUT/delta_rule_checks_after_value_beta.json
titans_order_value_beta|360|python -P -m nlgraph bench gated_deltanet --level mixer --anchor none --json $OUT/titans_order_vb_gdn.json && NLGRAPH_VALUE_BETA_GPU=0 python -P -m nlgraph bench equiv/gated_deltanet_titans_form --level mixer --anchor none --json $OUT/titans_order_vb_off.json && NLGRAPH_VALUE_BETA_GPU=1 python -P -m nlgraph bench equiv/gated_deltanet_titans_form --level mixer --anchor none --json $J
value_beta_rerun|200|python benchmarks/kernels.py --value-beta --skip-fla --skip-nlgraph-chunked --out $J
titans_order_value_beta_profile|360|NLGRAPH_VALUE_BETA_GPU=0 python benchmarks/profile_step.py equiv/gated_deltanet_titans_form --batch 4 --length 4096 --json $OUT/profile_titans_form_vb_off.json && NLGRAPH_VALUE_BETA_GPU=1 python benchmarks/profile_step.py equiv/gated_deltanet_titans_form --batch 4 --length 4096 --json $J && python benchmarks/profile_step.py gated_deltanet --batch 4 --length 4096 --json $OUT/profile_gdn_t4096_vb.json
titans_order_interleaved|420|for i in 1 2 3; do python -P -m nlgraph bench gated_deltanet --level mixer --anchor none --json $OUT/interleaved_gdn_$i.json && NLGRAPH_VALUE_BETA_GPU=0 python -P -m nlgraph bench equiv/gated_deltanet_titans_form --level mixer --anchor none --json $OUT/interleaved_vb_off_$i.json && NLGRAPH_VALUE_BETA_GPU=1 python -P -m nlgraph bench equiv/gated_deltanet_titans_form --level mixer --anchor none --json $OUT/interleaved_vb_on_$i.json; done
titans_order_vb_profile_d128|330|for vb in 0 1; do NLGRAPH_VALUE_BETA_GPU=$vb python benchmarks/profile_step.py equiv/gated_deltanet_titans_form --d-model 2048 --heads 16 --layers 1 --batch 4 --length 4096 --json $OUT/profile_titans_form_d128_vb$vb.json || exit 1; done && python benchmarks/profile_step.py gated_deltanet --d-model 2048 --heads 16 --layers 1 --batch 4 --length 4096 --json $J
titans_order_timing|300|python -P -m nlgraph bench gated_deltanet --level mixer --anchor none --json $OUT/titans_order_gdn.json && python -P -m nlgraph bench equiv/gated_deltanet_titans_form --level mixer --anchor none --json $J
titans_order_profile|300|python benchmarks/profile_step.py gated_deltanet --batch 4 --length 4096 --json $OUT/profile_gdn_t4096.json && python benchmarks/profile_step.py equiv/gated_deltanet_titans_form --batch 4 --length 4096 --json $J
gdn_layer_profile|300|python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes eager compile --json $J && python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet.json
layer_profile_tuned|420|export NLGRAPH_TRITON_AUTOTUNE=1 NLGRAPH_TRITON_WARPS=2,4,8; python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --no-fla --tuned --json $J && python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --no-fla --tuned --json $OUT/layer_profile_deltanet_tuned.json
head64_checks|200|python benchmarks/kernels.py --skip-fla --skip-nlgraph-chunked --out $J && python benchmarks/kernels.py --value-beta --skip-fla --skip-nlgraph-chunked --out $OUT/head64_checks_vb.json
layer_profile_head64|300|python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes eager compile --json $J && python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet_head64.json
layer_bench_head64|240|python -P -m nlgraph bench gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes eager compile --json $J && python -P -m nlgraph bench deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes eager compile --json $OUT/layer_bench_deltanet_head64.json
gdn_model_head64|300|python -P -m nlgraph bench gated_deltanet D512 --lengths 2048 4096 --tokens 16384 --modes compile-graph --json $J
kda_bf16_checks|120|python benchmarks/delta_rule_channel_kernel.py --checks 4 5 --no-timing --json $J
delta_rule_fla_profile|300|python benchmarks/kernels.py --skip-nlgraph-chunked --skip-checks --profile --out $J
hope_large_chunk_profile|420|python benchmarks/profile_step.py hope_large_chunk --batch 8 --length 2048 --warmup 1 --compile --graph --top 40 --json $J
conv_warps|200|python benchmarks/short_conv_kernel.py --warps 4 8 16 32 --json $J
conv_tiles|240|python benchmarks/short_conv_kernel.py --warps 4 --tiles 64x64 128x64 64x128 128x128 32x128 256x64 32x256 16x512 --json $J
conv_tile_layer|300|T=$(python benchmarks/short_conv_kernel.py --best-tile $OUT/conv_tiles.json) && echo "tile $T" && NLGRAPH_CONV_TILE=$T python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $J && python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --no-fla --json $OUT/layer_profile_gdn_tile_default.json
conv_da16|300|python benchmarks/short_conv_kernel.py --warps 4 --da float32 input --json $J && python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet_da16.json && python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_gated_deltanet_da16.json
conv_l2|300|python benchmarks/short_conv_kernel.py --warps 4 --json $J && python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet_l2.json && python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_gated_deltanet_l2.json
conv_dw_layout|200|python benchmarks/short_conv_kernel.py --warps 4 --dw rows inner atomic --json $J
h200_levels|300|python benchmarks/kernels.py --skip-nlgraph-chunked --out $J && python benchmarks/linear_attention_kernel.py --checks --json $OUT/la_timing.json
h200_layers|260|python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet.json && python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $J
momentum_layer_profile|420|for m in wide input; do NLGRAPH_RECURRENCE_PRODUCTS=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes eager compile --top 40 --json $OUT/momentum_layer_profile_$m.json || exit 1; done
gdn_level_sweep|420|python -P -m nlgraph bench gated_deltanet --level mixer --lengths 1024 2048 4096 8192 16384 --tokens 65536 --json $J
deltanet_level_sweep|420|python -P -m nlgraph bench deltanet --level mixer --lengths 1024 2048 4096 8192 16384 --tokens 65536 --json $J
momentum_model|420|python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --json $OUT/momentum_model_wide.json && NLGRAPH_RECURRENCE_PRODUCTS=input python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J
momentum_sums|540|python benchmarks/online_form.py --device cuda --check --batch 4 --length 4096 --heads 16 --dim 128 --dtype bfloat16 --json $OUT/online_form_sums.json; for m in rows atomic; do NLGRAPH_RECURRENCE_SUMS=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes eager compile --top 40 --json $OUT/momentum_layer_profile_sums_$m.json || exit 1; done; python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
deltanet_level_b16_tuned|300|python -P -m nlgraph bench deltanet --level mixer --lengths 4096 --batch 16 --json $OUT/deltanet_level_b16.json && NLGRAPH_TRITON_AUTOTUNE=1 python -P -m nlgraph bench deltanet --level mixer --lengths 4096 --batch 16 --anchor none --json $J
recurrence_configs|540|for c in 32:2:wide 32:1:wide 32:1:input 16:1:input 16:2:input; do IFS=: read r st m <<< "$c"; NLGRAPH_RECURRENCE_ROWS=$r NLGRAPH_RECURRENCE_STAGES=$st NLGRAPH_RECURRENCE_PRODUCTS=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/recurrence_config_${r}_${st}_${m}.json || exit 1; done; for c in 16:1 32:1; do IFS=: read r st <<< "$c"; NLGRAPH_RECURRENCE_ROWS=$r NLGRAPH_RECURRENCE_STAGES=$st python benchmarks/online_form.py --device cuda --check --checks-only --json $OUT/recurrence_checks_${r}_${st}.json || exit 1; done
recurrence_states|420|python benchmarks/online_form.py --device cuda --check --checks-only --states input --json $OUT/recurrence_checks_states_input.json || exit 1; for m in float32 input; do NLGRAPH_RECURRENCE_STATES=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/recurrence_states_$m.json || exit 1; done; NLGRAPH_RECURRENCE_STATES=input python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
gpu_kernel_tests|560|rc=0; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_recurrence.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_linear_attention.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_delta_rule.py || rc=1; exit $rc
gpu_kernel_tests_b|560|rc=0; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_dispatch.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_solve_lower.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_short_conv.py || rc=1; exit $rc
gpu_deep_kernel_tests|560|rc=0; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_mlp_memory.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_chunk_walk.py || rc=1; exit $rc
gpu_deep_kernel_tests_b|560|rc=0; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_scan.py || rc=1; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/compilers/test_kernels_precompile.py || rc=1; exit $rc
small_heads|360|python -P benchmarks/small_heads.py --cases 8x6 16x16 --json $J
delta_rule_b16_profile|300|python benchmarks/kernels.py --skip-nlgraph-chunked --skip-checks --batch 16 --profile --out $J
momentum_kernels|560|HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider tests/compilers/test_kernels_recurrence.py || exit 1; for c in pytorch:pytorch:pytorch kernel:kernel:pytorch kernel:kernel:kernel; do IFS=: read p g r <<< "$c"; NLGRAPH_RECURRENCE_PREPARE=$p NLGRAPH_RECURRENCE_GATES=$g NLGRAPH_RECURRENCE_READS=$r python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/momentum_kernels_${p}_${g}_${r}.json || exit 1; done
momentum_kernels_levels|560|for m in pytorch kernel; do NLGRAPH_RECURRENCE_PREPARE=$m NLGRAPH_RECURRENCE_GATES=$m NLGRAPH_RECURRENCE_READS=$m python benchmarks/online_form.py --device cuda --check --dtype bfloat16 --batch 4 --length 4096 --heads 16 --dim 128 --json $OUT/online_form_kernels_$m.json || exit 1; done
momentum_kernels_model|560|M=(titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph); NLGRAPH_RECURRENCE_PREPARE=pytorch NLGRAPH_RECURRENCE_GATES=pytorch python -P -m nlgraph bench "${M[@]}" --json $OUT/momentum_kernels_model_pytorch.json || exit 1; NLGRAPH_RECURRENCE_PREPARE=kernel NLGRAPH_RECURRENCE_GATES=kernel python -P -m nlgraph bench "${M[@]}" --anchor none --json $OUT/momentum_kernels_model_kernel.json || exit 1; NLGRAPH_RECURRENCE_PREPARE=kernel NLGRAPH_RECURRENCE_GATES=kernel NLGRAPH_RECURRENCE_READS=kernel python -P -m nlgraph bench "${M[@]}" --anchor none --json $J
solve_rows|560|HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider tests/compilers/test_solve_lower.py || exit 1; python -P benchmarks/chunk_solve.py --modes triangular kernel --kernel-products ieee --json $J || exit 1; for r in 16 32; do NLGRAPH_SOLVE_ROWS=$r python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --json $OUT/solve_rows_${r}_model.json || exit 1; done
recurrence_bwd_warps|480|NLGRAPH_RECURRENCE_BWD_WARPS=8 HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider tests/compilers/test_kernels_recurrence.py -k "equals_the_loop or levels_without" || exit 1; for w in 4 8; do NLGRAPH_RECURRENCE_BWD_WARPS=$w python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/recurrence_bwd_warps_$w.json || exit 1; done
recurrence_reads_model|480|NLGRAPH_RECURRENCE_READS=pytorch python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --json $OUT/recurrence_reads_model_pytorch.json && NLGRAPH_RECURRENCE_READS=kernel python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J
state_bwd_split|540|NLGRAPH_STATE_BWD_SPLIT=1 python benchmarks/kernels.py --skip-nlgraph-chunked --batch 16 --profile --out $J && NLGRAPH_STATE_BWD_SPLIT=1 python benchmarks/kernels.py --skip-nlgraph-chunked --skip-fla --out $OUT/state_bwd_split_b4.json && NLGRAPH_STATE_BWD_SPLIT=1 NLGRAPH_TRITON_AUTOTUNE=1 python benchmarks/kernels.py --skip-nlgraph-chunked --skip-checks --skip-fla --batch 16 --profile --out $OUT/state_bwd_split_b16_tuned.json
gated_fla_unguarded|360|python benchmarks/kernels.py --skip-nlgraph-chunked --fla-gated-unguarded --out $J
recurrence_reads_rows|540|for m in 0 32; do NLGRAPH_RECURRENCE_READS=kernel NLGRAPH_RECURRENCE_READS_ROWS=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/recurrence_reads_rows_$m.json || exit 1; done; HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider tests/compilers/test_kernels_recurrence.py -k reads_kernel
recurrence_reads|480|HYPOTHESIS_PROFILE=ci python -P -m pytest -q -p no:cacheprovider tests/compilers/test_kernels_recurrence.py || exit 1; for m in pytorch kernel; do NLGRAPH_RECURRENCE_READS=$m python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 16}' vars.d_model=2048 vars.heads=16 levels.memory.gradient_point=token --layer memory --no-fla --batch 4 --length 4096 --modes compile --top 40 --json $OUT/recurrence_reads_$m.json || exit 1; done; NLGRAPH_RECURRENCE_READS=kernel python -P -m nlgraph bench titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.layers=4 vars.heads=8 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
conv_dw_layer|400|for l in rows atomic inner; do NLGRAPH_CONV_DW=$l python -P benchmarks/profile_layer.py deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --json $OUT/layer_profile_deltanet_dw_$l.json || exit 1; done
mlp_products_input|560|python benchmarks/mlp_memory_kernel.py --no-timing --checks 2 8 9 10 --splits 0 1 --json $OUT/mlp_products_input_checks.json; NLGRAPH_MLP_PRODUCTS=tf32 python -P -m nlgraph bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --json $OUT/titans_products_tf32.json && python -P -m nlgraph bench titans D512 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J && python benchmarks/model_speed.py --budget 0 --check-specs titans --check-compile --json $OUT/model_check_titans_products_input.json
chunk_solve|540|python -P benchmarks/chunk_solve.py --modes triangular blocked --json $J && NLGRAPH_CHUNK_SOLVE=triangular python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --json $OUT/chunk_solve_triangular_model.json && NLGRAPH_CHUNK_SOLVE=blocked python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --json $OUT/chunk_solve_blocked_model.json
chunk_solve_kernel|560|python -P benchmarks/chunk_solve.py --modes triangular kernel --json $J && NLGRAPH_CHUNK_SOLVE=triangular python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --json $OUT/chunk_solve_triangular_model.json && NLGRAPH_CHUNK_SOLVE=kernel python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 16384 --modes compile-graph --steps 3 --anchor none --json $OUT/chunk_solve_kernel_model.json
layer_stages_tuned|200|export NLGRAPH_TRITON_AUTOTUNE=1 NLGRAPH_TRITON_WARPS=4; python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --no-fla --tuned --reps 3 --json $J
kda_stages_tuned|300|export NLGRAPH_TRITON_AUTOTUNE=1; python benchmarks/delta_rule_channel_kernel.py --no-fla --profile --json $J
la_timing|240|python benchmarks/linear_attention_kernel.py --checks --json $J
transfer_check|240|python benchmarks/transfer_cost.py --device cuda --check --sizes 16 64 256 --batch 640 --specs hope_large_chunk:2048:4 titans:2048:8 --json $J
online_recurrence_bf16|300|python benchmarks/online_form.py --device cuda --check --dtype bfloat16 --batch 4 --length 4096 --heads 16 --dim 128 --json $J
titans_chunk64_model|300|python -P -m nlgraph bench titans D512 levels.memory.gradient_point.chunk=64 --lengths 2048 --tokens 16384 --modes compile-graph --json $J
titans_chunk64_quick|150|python -P -m nlgraph bench titans D512 levels.memory.gradient_point.chunk=64 --lengths 2048 --tokens 16384 --modes compile-graph --anchor none --json $J
online_recurrence_check_short|240|python benchmarks/online_form.py --device cuda --check --batch 2 --length 1024 --heads 16 --dim 128 --json $J
online_recurrence_check|300|python benchmarks/online_form.py --device cuda --check --batch 4 --length 4096 --heads 16 --dim 128 --json $J
walk_first|540|python benchmarks/chunk_walk.py --check --reps 10 --json $J; NLGRAPH_CHUNK_WALK_GPU=0 python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 8192 --modes graph --steps 3 --anchor none --json $OUT/hope_large_chunk_walk_off_graph.json; NLGRAPH_CHUNK_WALK_GPU=1 python -P -m nlgraph bench hope_large_chunk D512 --lengths 2048 --tokens 8192 --modes graph --steps 3 --anchor none --json $OUT/hope_large_chunk_walk_on_graph.json
fp32_products|480|NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/linear_attention_kernel.py --no-timing --json $J; NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/linear_attention_kernel.py --channel --no-timing --json $OUT/fp32_products_gla.json; NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/delta_rule_channel_kernel.py --no-timing --json $OUT/fp32_products_kda.json
fp32_products_recurrence|240|NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/online_form.py --device cuda --check --batch 2 --length 1024 --heads 16 --dim 128 --json $J
fp32_products_check|230|NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/kernels.py --dtype float32 --skip-fla --skip-nlgraph-chunked --out $J
fp32_products_ieee|150|NLGRAPH_FP32_PRODUCTS=ieee python benchmarks/kernels.py --dtype float32 --skip-fla --skip-nlgraph-chunked --skip-checks --out $J
gdn_compile_cache_fp32_x3|200|NLGRAPH_FP32_PRODUCTS=tf32x3 python benchmarks/compile_check.py gated_deltanet --cold --precision fp32 --d-model 512 --heads 8 --layers 4 --length 2048 --batch 4 --steps 2 --child-timeout 120 --trace-subprocesses --json $J
hope_walk_graph_b2|440|timeout 210 env NLGRAPH_CHUNK_WALK_GPU=0 python -P -m nlgraph bench hope D512 --lengths 2048 --tokens 4096 --modes graph --steps 2 --anchor none --json $OUT/hope_walk_off_graph_b2.json; timeout 210 env NLGRAPH_CHUNK_WALK_GPU=1 python -P -m nlgraph bench hope D512 --lengths 2048 --tokens 4096 --modes graph --steps 2 --anchor none --json $J
walk_model_check|200|python benchmarks/walk_model_check.py --json $J
walk_chunks|150|python benchmarks/chunk_walk.py --chunks 16 32 64 128 --reps 10 --json $J
hope_walk_profile|420|NLGRAPH_CHUNK_WALK_GPU=1 python benchmarks/profile_step.py hope --d-model 512 --layers 4 --heads 8 --batch 2 --length 512 --warmup 1 --json $J
hope_graph_profile|300|python benchmarks/profile_step.py hope --d-model 512 --layers 4 --heads 8 --batch 2 --length 512 --warmup 1 --graph --json $J
hope_compile_graph_profile|420|python benchmarks/profile_step.py hope --d-model 512 --layers 4 --heads 8 --batch 2 --length 512 --warmup 1 --compile --graph --json $J
titans_graph_profile|300|python benchmarks/profile_step.py titans --d-model 512 --layers 4 --heads 8 --batch 8 --length 2048 --compile --graph --json $J
walk_tuning|200|NLGRAPH_WALK_PREFETCH=0 python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $OUT/walk_checks_pf0.json; NLGRAPH_WALK_PREFETCH=1 python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $J
walk_kernels|200|for pf in 0 1; do for k in 4 8 16; do NLGRAPH_WALK_PREFETCH=$pf NLGRAPH_WALK_CHECKPOINT=$k python benchmarks/chunk_walk.py --kernels-only --batch 2 --chunks 16 64 --reps 20 --json $OUT/walk_kernels_pf${pf}_k${k}.json; done; done
walk_check|120|python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $J
walk_layout_timing|150|for tw in 2048:4 512:1 1024:2 512:2 1024:1; do NLGRAPH_WALK_TILE=${tw%:*} NLGRAPH_WALK_WARPS=${tw#*:} python benchmarks/chunk_walk.py --kernels-only --batch 2 --chunks 16 --reps 20 --json $OUT/walk_layout_${tw%:*}_${tw#*:}.json; done
walk_layout_check_w1|90|NLGRAPH_WALK_TILE=512 NLGRAPH_WALK_WARPS=1 python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $J
walk_layout_check_w2|90|NLGRAPH_WALK_TILE=1024 NLGRAPH_WALK_WARPS=2 python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $J
walk_layout_check_1024|90|NLGRAPH_WALK_TILE=1024 NLGRAPH_WALK_WARPS=1 python benchmarks/chunk_walk.py --check --no-timing --chunks 16 40 --json $J
gate_fusion_titans|300|for r in fused separate; do f=""; [ $r = separate ] && f=--separate-gates; python -P benchmarks/profile_layer.py titans 'levels.memory.memory={kind: linear, heads: 8}' levels.memory.gradient_point=token vars.d_model=512 vars.heads=8 --layer memory --modes compile --no-fla $f --json $OUT/gate_fusion_titans_$r.json || exit 1; done
layer_changes|480|L="vars.d_model=512 vars.heads=8 --layer mixer --modes compile"; python -P benchmarks/profile_layer.py gated_deltanet $L --json $OUT/layer_profile_gdn_s35.json || exit 1; python -P benchmarks/profile_layer.py gated_deltanet $L --separate-casts --json $OUT/layer_profile_gdn_separate_casts.json || exit 1; python -P benchmarks/profile_layer.py gated_deltanet $L --separate-casts --separate-gates --json $OUT/layer_profile_gdn_before_s34.json || exit 1; python -P benchmarks/profile_layer.py deltanet $L --json $OUT/layer_profile_deltanet_s35.json || exit 1; python -P benchmarks/profile_layer.py deltanet $L --separate-casts --json $J
gdn_layer_code|200|TORCH_LOGS=output_code python -P benchmarks/profile_layer.py gated_deltanet vars.d_model=512 vars.heads=8 --layer mixer --modes compile --no-fla --json $J
ddp_2gpu|540|python benchmarks/ddp_check.py --procs 2 --d-model 512 --layers 4 --length 4096 --batch 8 --steps 20 --json $J
EOF
}

if [ "${1:-}" = "--list" ] || [ $# -eq 0 ]; then
  steps | while IFS='|' read -r name secs cmd; do printf '%-24s %4ss  %s\n' "$name" "$secs" "${cmd//D512/${D512[*]}}"; done
  echo "(ddp_2gpu needs the nvidia-h200-x2 kind)"
  exit 0
fi

OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
# the whole call's budget: a device command is killed at 600 s, and with it the archive written at the
# end, so each step gets at most what is left of this (less 20 s to pack), and a step that would get
# under 30 s is skipped: list the steps in order of priority
start=$(date +%s)
BUDGET=${GPU_SESSION_BUDGET:-570}
bash benchmarks/device.sh true > "$OUT/install.log" 2>&1 || { echo "install failed: $OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/pkg:/tmp/site TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
[ -f benchmarks/autotune_sm90.tar.gz ] && tar -xzf benchmarks/autotune_sm90.tar.gz -C "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

for want in "$@"; do
  line=$(steps | grep "^${want}|") || { echo "$want: no such step (--list)" | tee -a "$OUT/steps.txt"; continue; }
  IFS='|' read -r name secs cmd <<< "$line"
  J="$OUT/$name.json"
  cmd=${cmd//\$J/$J}
  cmd=${cmd//D512/${D512[*]}}
  t0=$(date +%s)
  left=$(( BUDGET - 20 - (t0 - start) ))
  if [ "$left" -lt 30 ]; then echo "$name skipped: ${left}s of the call's budget left" | tee -a "$OUT/steps.txt"; continue; fi
  [ "$left" -lt "$secs" ] && secs=$left
  # the whole working tree is the package's source: run from the root with the installed layout
  timeout "$secs" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s  $cmd" | tee -a "$OUT/steps.txt"
done
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/autotune.tar.gz" --null -T -) || true
# the device tool brings back at most 8 files: the steps' logs and JSON travel as one archive, a new
# one for each run into the same $OUT (results.tar.gz, then results-2.tar.gz, ...)
archive=results.tar.gz; n=1
while [ -e "$OUT/$archive" ]; do n=$((n + 1)); archive=results-$n.tar.gz; done
(cd "$OUT" && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.json' -o -name '*.txt' \) ! -name steps.txt -printf '%f\0' \
   | tar -czf "$archive" --null -T - --remove-files) || true
