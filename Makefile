# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CLI     = $(VENV)/bin/vlpet-fx
STAMP   = $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_VERBOSITY = error

.PHONY: demo test bench install clean

FMNIST = /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "note: could not install Debian's dataset-fashion-mnist; the demo needs it (apt-get install dataset-fashion-mnist)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,pretrained]"
	touch $(STAMP)

install: $(STAMP)

# The main job: (1) train a small VL-T5 backbone (open_clip ViT tower + T5, d = 64) in full on MNIST digit tasks,
# (2) freeze it and adapt it with VL-PET-large to the four Fashion-MNIST tasks, (3) the same with the images
# blanked (text-only control), then compare. VL-PET-large runs at the paper's widths *relative to the model*
# (rules/vlpet_large_relative.yaml: r = r_g = d/8, as r = 96 on BART-base's d = 768), so it trains a paper-like
# share of the model; each image's patch tokens are projected one by one, as the paper's visual embedding does.
# The backbone trains 3,000 steps: reading 16 patch tokens per image (not one token of all 16 side by side) takes
# that long on this random 2-layer tower; the adaptation runs use lr 3e-3 (the 18,000 trainable parameters learn
# too little at the quick recipe's 1e-3 in 1,500 steps). Each factor measured: docs/bench/demo-factors/README.md;
# 6.68 % trainable; scores and time: BENCHMARKS.md, docs/bench/make-demo/.
DEMO_ARGS = --train-per-task 1500 --eval-per-task 100 --eval-every 500 --save-every 500
PET_LR = 3e-3
DEMO_RULES = vlpet_large_relative
demo: $(STAMP)
	rm -rf demo
	$(CLI) inspect t5 --size tiny --rules $(DEMO_RULES)
	$(CLI) train --out demo/backbone --rules full_finetune --source mnist --steps 3000 $(DEMO_ARGS)
	$(CLI) train --out demo/vlpet-large --init-from demo/backbone --rules $(DEMO_RULES) --source fashion-mnist --steps 1500 --lr $(PET_LR) $(DEMO_ARGS)
	$(CLI) train --out demo/text-only --init-from demo/backbone --rules $(DEMO_RULES) --source fashion-mnist --steps 1500 --text-only --lr $(PET_LR) $(DEMO_ARGS)
	$(CLI) report demo/backbone demo/vlpet-large demo/text-only
	@echo "curves: demo/vlpet-large/curves.png; predictions: demo/vlpet-large/predictions.jsonl"

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# Quick versions of the benchmarks (about 4 min on 2 cores); BENCHMARKS.md has the full commands.
bench: $(STAMP)
	rm -rf bench/out/quality-quick && mkdir -p bench/out
	$(PY) bench/capture.py --quick --plot bench/out/capture-quick.png
	$(PY) bench/budget.py
	$(PY) bench/step.py --rounds 3 --flops --variants full eager/vlpet_large graph/vlpet_large hand/vlpet_large peft-lora/vlpet_large eager/lora-peft
	$(PY) bench/quality.py --quick --families t5

clean:
	rm -rf $(VENV) build *.egg-info demo
