#!/bin/bash
# Call 3: stage 8 four ways at once from the shipped head, one per GPU, equal time (MIN minutes).
# A: --draft-vocab 16384, all data; B: full vocabulary, all data; C: A with lr 5e-4; D: A with 5 ttt steps.
export PYTHONUNBUFFERED=1; export PYTHONPATH=/tmp/site
CK=checkpoints/SmolLM2-135M-Instruct; H=heads/SmolLM2-135M-Instruct
[ -f $CK/model.pth ] || scripts/prepare_smollm2.sh --gguf $HOME/SmolLM2-135M-Instruct.Q4_1.gguf > /dev/null 2>&1
D=$(ls $HOME/d/data*.pt | paste -sd, -)
echo "data: $D"
common="--checkpoint $CK --data $D --init $H --epochs 10 --warmup 50 --max-minutes ${MIN:-8.2} --feature-weight 0.1 --ce-weight 1 --holdout 0.02"
CUDA_VISIBLE_DEVICES=0 python scripts/train_eagle.py $common --lr 3e-4 --ttt-steps 4 --draft-vocab 16384 --out $HOME/hA > $HOME/trainA.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 python scripts/train_eagle.py $common --lr 3e-4 --ttt-steps 4 --out $HOME/hB > $HOME/trainB.log 2>&1 &
CUDA_VISIBLE_DEVICES=2 python scripts/train_eagle.py $common --lr 5e-4 --ttt-steps 4 --draft-vocab 16384 --out $HOME/hC > $HOME/trainC.log 2>&1 &
CUDA_VISIBLE_DEVICES=3 python scripts/train_eagle.py $common --lr 3e-4 --ttt-steps 5 --draft-vocab 16384 --out $HOME/hD > $HOME/trainD.log 2>&1 &
wait
for x in A B C D; do echo "== $x"; grep "^epoch\|rror\|conversations" $HOME/train$x.log; python bench/2026-11-27_s13_to_bf16.py $HOME/h$x $OUT/h$x $H && cp $HOME/h$x/draft_vocab.safetensors $HOME/h$x.vocab 2>/dev/null; done
