# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the CPU-capable builds this project is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DATA ?= data/synthetic
RUN ?= runs/demo

.PHONY: install demo demo-objects test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	test -f $(DATA)/dataset.json || $(PY) -m densemtl data synth --out $(DATA) --overwrite --train 2000 --val 400 --size 256x512 --seed 0
	$(PY) -m densemtl data preview $(DATA) --split val -n 8 --out $(RUN)/preview.png
	$(PY) -m densemtl train --config configs/synthetic.yaml --set data.root=$(DATA) --set train.out_dir=$(RUN) --overwrite
	$(PY) -m densemtl evaluate --checkpoint $(RUN)/best.pt --split val --out $(RUN)/eval_val
	$(PY) -m densemtl predict --checkpoint $(RUN)/best.pt --out $(RUN)/predictions $$(ls $(DATA)/val/images/* | head -n 6)
	$(PY) -m densemtl report $(RUN)
	@echo "demo finished: open $(RUN)/report.md"

# The demo with the objects head too (docs/objects.md); synthetic data rendered before objects files existed
# (dataset.json without object_classes) is rendered again.
OBJ_RUN ?= runs/demo_objects
# It fine-tunes an ImageNet MobileNetV2: torchvision's weights, downloaded once, or this local copy when it exists
# (../shared beside the checkout; offline, point it at a copy: make demo-objects BACKBONE_WEIGHTS=PATH).
BACKBONE_WEIGHTS ?= $(wildcard ../shared/weights/mobilenet_v2_imagenet_features.pth)
demo-objects: install
	grep -q object_classes $(DATA)/dataset.json 2>/dev/null || $(PY) -m densemtl data synth --out $(DATA) --overwrite --train 2000 --val 400 --size 256x512 --seed 0
	$(PY) -m densemtl data preview $(DATA) --split val -n 8 --out $(OBJ_RUN)/preview.png
	$(PY) -m densemtl train --config configs/synthetic_objects.yaml --set data.root=$(DATA) --set train.out_dir=$(OBJ_RUN) --overwrite \
		$(if $(BACKBONE_WEIGHTS),--set model.backbone_weights=$(BACKBONE_WEIGHTS))
	$(PY) -m densemtl evaluate --checkpoint $(OBJ_RUN)/best.pt --split val --out $(OBJ_RUN)/eval_val
	$(PY) -m densemtl predict --checkpoint $(OBJ_RUN)/best.pt --out $(OBJ_RUN)/predictions --bev $$(ls $(DATA)/val/images/* | head -n 6)
	$(PY) -m densemtl report $(OBJ_RUN)
	@echo "objects demo finished: open $(OBJ_RUN)/report.md"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/latency.py --runs 30
	$(PY) benchmarks/synth_speed.py --n 96
	test ! -f $(RUN)/best.pt || $(PY) -m densemtl benchmark --checkpoint $(RUN)/best.pt --size 480x640 --threads 2 --json benchmarks/results/deploy_480x640.json

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf runs build .pytest_cache
