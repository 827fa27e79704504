#!/usr/bin/env bash
# Does pre-training help? Fine-tune EPG-T from RCM-T and from scratch, evaluated on samples while it trains (the
# paper's Table 6 question, at CPU scale on the embedded data set), then draw the curves. `make headstart` runs it;
# every setting below can be overridden from the environment, e.g. SEEDS="0" DM_STEPS=1200 make headstart.
# Arms: diffusion under the T preset (constant lr) and under a warm-up + cosine schedule that keeps more of the
# pre-trained encoder; consistency under the T preset. Runs that finished are skipped, cut ones resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/headstart}
SEEDS=${SEEDS:-0 1}
PT_STEPS=${PT_STEPS:-2000}            # RCM-T pre-training schedule (cosine to 0 over these steps) ...
PT_USE=${PT_USE:-1000}                # ... of which the fine-tunings start from this step's kept checkpoint
DM_STEPS=${DM_STEPS:-2400}; DM_EVERY=${DM_EVERY:-600}; WARM_EVERY=${WARM_EVERY:-800}
CM_STEPS=${CM_STEPS:-400}; CM_EVERY=${CM_EVERY:-100}
SAMPLES=${SAMPLES:-500}               # class-balanced samples per evaluation
RCM=$OUT/rcm_t/$(printf "ckpt_%07d.pt" "$PT_USE")

run() { echo "+ $*"; "$PY" "$@"; }
run pretrain.py --model T --steps "$PT_STEPS" --probe-every 500 --keep-every "$PT_USE" --out "$OUT/rcm_t"
for arm in const cm warm; do
  for seed in $SEEDS; do
    for start in rcm scratch; do
      init=(--init "$RCM"); [ "$start" = scratch ] && init=(--from-scratch)
      common=(--model T --seed "$seed" --eval-samples "$SAMPLES" "${init[@]}")
      case $arm in
        const) run train_diffusion.py "${common[@]}" --steps "$DM_STEPS" --eval-every "$DM_EVERY" \
                   --out "$OUT/dm_const_${start}_s$seed" ;;
        cm)    run train_consistency.py "${common[@]}" --steps "$CM_STEPS" --eval-every "$CM_EVERY" \
                   --out "$OUT/cm_${start}_s$seed" ;;
        warm)  run train_diffusion.py "${common[@]}" --steps "$DM_STEPS" --eval-every "$WARM_EVERY" \
                   --lr-schedule cosine --warmup 300 --out "$OUT/dm_warm_${start}_s$seed" ;;
      esac
    done
  done
done
for metric in class_acc fd_ref; do
  run tools/curves.py "$OUT"/dm_* --metric "$metric" heldout_loss probe_acc --out "$OUT/diffusion_$metric.png"
done
run tools/curves.py "$OUT"/dm_* "$OUT"/cm_* --metric class_acc fd_ref heldout_loss probe_acc --x flops \
    --out "$OUT/headstart_flops.png"
run tools/curves.py "$OUT"/dm_* "$OUT"/cm_* --metric class_acc fd_ref heldout_loss probe_acc --out "$OUT/headstart.png"
echo "curves: $OUT/headstart.png (per step), $OUT/headstart_flops.png (per training FLOP, pre-training included)"
