#!/usr/bin/env bash
# GPU machine side of issue 3's full zero-shot splits (staged by scripts/stage_zeroshot.sh).
#   device_zeroshot.sh collect           copy whichever staged folders this call carried to $ZS
#   device_zeroshot.sh setup             install the wheels; per staged model: join its chunks, check
#                                        the sha256, convert the GGUF once into the model cache
#   device_zeroshot.sh run OUT N ARGS..  N background `arcquant compare --preset paper` processes,
#                                        the labels dealt round-robin, each into OUT/pK, process K on
#                                        GPU K mod (number of GPUs); LABELS="a|b|.."
#                                        (each process runs its share in this order) instead of the
#                                        whole preset; ARGS may name --model
#   device_zeroshot.sh tasks OUT N ARGS.. as run, but each process runs scripts/zeroshot_tasks.py for
#                                        its labels one after another (OUT/pK/tasks.jsonl: a line per
#                                        finished task, so a cut run keeps them); ARGS: its flags
#   device_zeroshot.sh pack OUT          the finished cells / tasks and log tails into $OUT/cells.tgz
set -euo pipefail
ZS=${ZS:-/tmp/zs}; PY=${PY:-python3}
env_line() { echo "export PYTHONPATH=$ZS/pkgs:$ZS/base/site:$PWD ARCQUANT_CACHE=$ZS/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"; }
case $1 in
collect)
  mkdir -p $ZS; shopt -s nullglob; for d in .stage/*/; do cp -r $d $ZS/; done; ls $ZS ;;
setup)
  [ "${WHEELS:-1}" = 1 ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target $ZS/pkgs $ZS/arrow/*.whl $ZS/base/wheels/*.whl
  eval "$(env_line)"; mkdir -p $ZS/gguf
  for f in $ZS/base/models/*.sha256; do
    m=$(basename $f .sha256)
    compgen -G "$ZS/$m.*/chunk" > /dev/null || { echo "$m: no chunks collected, skipped"; continue; }
    cat $ZS/$m.*/chunk > $ZS/gguf/$m.gguf
    echo "$(cat $f)  $ZS/gguf/$m.gguf" | sha256sum -c -
    $PY -c "import sys; from arcquant.modeling import resolve_model; print(resolve_model(sys.argv[1]))" $ZS/gguf/$m.gguf
  done ;;
run|tasks)
  mode=$1; out=$2; n=$3; shift 3; eval "$(env_line)"
  labels=${LABELS:+$(tr '|' '\n' <<< "$LABELS")}
  labels=${labels:-$($PY -c "from arcquant.compare import PRESETS; print('\n'.join(PRESETS['paper']))")}
  ngpu=$(nvidia-smi -L | grep -c GPU)
  for k in $(seq 0 $((n - 1))); do
    mine=(); i=0
    while IFS= read -r l; do [ $((i % n)) = $k ] && mine+=("$l"); i=$((i + 1)); done <<< "$labels"
    mkdir -p $out/p$k
    export CUDA_VISIBLE_DEVICES=$((k % ngpu)) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=4
    if [ $mode = run ]; then
      setsid nohup $PY -m arcquant.cli compare --preset paper --only "${mine[@]}" \
        --out $out/p$k "$@" > $out/p$k/log 2>&1 < /dev/null &
    else                                   # ARGS, then --, then this process's labels
      setsid nohup bash -c 'o=$1 py=$2; shift 2; a=(); while [ "$1" != -- ]; do a+=("$1"); shift; done; shift
        for l in "$@"; do $py scripts/zeroshot_tasks.py --label "$l" --out $o "${a[@]}"; done' \
        _ $out/p$k/tasks.jsonl $PY "$@" -- "${mine[@]}" > $out/p$k/log 2>&1 < /dev/null &
    fi
  done ;;
pack)
  cd $2; for d in */; do tail -c 3000 $d/log > $d/log.tail; done
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader || true
  tar czf $OUT/cells.tgz */results.jsonl */tasks.jsonl */log.tail 2>/dev/null || true
  for d in */; do echo "$d $(cat $d/results.jsonl $d/tasks.jsonl 2>/dev/null | grep -c .) done, $(grep -c Traceback $d/log) failed;" \
    "$(tail -c 100 $d/log | tr '\r\n' '  ' | tail -c 80)"; done ;;
esac
