#!/bin/bash
# Call 2 on a 4-GPU machine (after call 1 copied .stage/0 to ~/stage): carry .stage/1 .whl .diag/s13.
# GGUF, then data seeds 8-11 at once, one per GPU; left in ~/d for call 3.
export PYTHONUNBUFFERED=1
cat $HOME/stage/*part00 .stage/1/*part01 > $HOME/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
scripts/prepare_smollm2.sh --gguf $HOME/SmolLM2-135M-Instruct.Q4_1.gguf > /dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $HOME/d; T0=$SECONDS
for i in 0 1 2 3; do s=$((8+i))
  (CUDA_VISIBLE_DEVICES=$i timeout 420 python scripts/make_eagle_data.py --checkpoint checkpoints/SmolLM2-135M-Instruct --out $HOME/d/data$s.pt --num ${NUM:-28000} --seed $s > $HOME/d/gen$s.log 2>&1; echo "data$s rc=$? $((SECONDS-T0)) s"; tail -c 400 $HOME/d/gen$s.log) &
done
wait
ls -la $HOME/d
