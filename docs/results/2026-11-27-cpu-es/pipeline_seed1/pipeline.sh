set -x
# from the repository root
# ES_DATA_DIR: the MNIST folder (see README "Quick start")
R=${R:-runs/pipeline_seed1}
mkdir -p $R
es-service backprop --config configs/mnist_seed.yaml --run-dir $R/backprop_masked --epochs 30 --device cpu --set seed=1 --force > $R/bp.log 2>&1
es-service backprop --config configs/mnist_seed.yaml --run-dir $R/backprop_finetune --epochs 10 --learning-rate 0.0001 --init-from $R/backprop_masked/checkpoint.pt --device cpu --set seed=1 --force > $R/ft.log 2>&1
es-service train --config configs/mnist_es_finetune.yaml --run-dir $R/es_finetune --init-from $R/backprop_finetune/checkpoint.pt --set seed=1 --quiet --force > $R/es.log 2>&1
es-service eval $R/es_finetune/checkpoint.pt --device cpu > $R/eval.json 2>&1
