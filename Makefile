# Every target is a thin call of the `asda` command line; `setup` runs first wherever it is needed, so a fresh
# clone needs nothing but `make <target>`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all lint model-info data pretrain probe finetune sweep report ray-up ray-down mlflow-ui \
        bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## test: the fast suite (everything not marked slow)
test: setup lint
	$(BIN)/pytest -q -m "not slow" --durations=15

## test-all: every test, slow ones included
test-all: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check model pipelines sweeps bench tests

## model-info: resolved config and parameter counts, e.g. make model-info PRESET=tiny ARGS="diff_lambda=0.5"
PRESET ?= base
ARGS   ?=
model-info: setup
	$(BIN)/asda model --preset $(PRESET) $(ARGS)

## data: prepare a data set (default: the synthetic one), e.g. make data DATASET=esc50 SOURCE=~/ESC-50-master
DATASET ?= synthetic
SOURCE  ?=
data: setup
	$(BIN)/asda prepare --dataset $(DATASET) $(if $(SOURCE),--source $(SOURCE)) $(ARGS)

## pretrain / probe / finetune: the embedded default unless ARGS say otherwise (e.g. ARGS="--workers 2")
pretrain: setup
	$(BIN)/asda pretrain --name $(or $(NAME),pretrain-default) $(ARGS)

probe: setup
	$(BIN)/asda probe --checkpoint results/$(or $(NAME),pretrain-default) $(ARGS)

finetune: setup
	$(BIN)/asda finetune --checkpoint results/$(or $(NAME),pretrain-default) $(ARGS)

## sweep: an ablation grid on Ray Tune, e.g. make sweep GRID=smoke (default: ablation)
GRID ?= ablation
sweep: setup
	$(BIN)/asda sweep --grid $(GRID) $(ARGS)

report: setup
	$(BIN)/asda report --sweep $(SWEEP) $(ARGS)

## ray-up / ray-down: a local Ray head (dashboard on 127.0.0.1:8265, token auth on) that sweeps then join;
## WORKERS=N also starts N more nodes on this machine over loopback, so the multi-node path runs here too
RAY_CPUS    ?= $(shell echo $$(( $$(nproc) * 3 )))
WORKERS     ?= 0
WORKER_CPUS ?= 3
RAY_PORT    ?= 6379
RAY_DASHBOARD_PORT ?= 8265
RAY_AGENT_PORT ?= 52365
RAY_TEMP_DIR ?=
RAY_TEMP     = $(or $(RAY_TEMP_DIR),/tmp/ray)
# Every process of the cluster inherits this mark from `ray start`: ray-down stops the processes that carry it.
RAY_UP_MARK  = $(RAY_TEMP)/ray-up-$(RAY_PORT)
# Token authentication, explicitly: every node and client of this user shares the token in ~/.ray/auth_token,
# made here the first time. Nodes on one machine each need their own dashboard-agent port (node i: base + i).
ray-up: setup
	test -s $(HOME)/.ray/auth_token || (umask 077 && $(BIN)/ray get-auth-token --generate >/dev/null)
	chmod 600 $(HOME)/.ray/auth_token
	ASDA_RAY_UP=$(RAY_UP_MARK) RAY_AUTH_MODE=token $(BIN)/ray start --head --num-cpus=$(RAY_CPUS) --node-ip-address=127.0.0.1 \
		--port=$(RAY_PORT) --dashboard-host=127.0.0.1 --dashboard-port=$(RAY_DASHBOARD_PORT) \
		--dashboard-agent-listen-port=$(RAY_AGENT_PORT) --disable-usage-stats \
		$(if $(RAY_TEMP_DIR),--temp-dir=$(RAY_TEMP_DIR))
	for i in $$(seq 1 $(WORKERS)); do \
		ASDA_RAY_UP=$(RAY_UP_MARK) RAY_AUTH_MODE=token $(BIN)/ray start --address=127.0.0.1:$(RAY_PORT) --node-ip-address=127.0.0.1 \
			--num-cpus=$(WORKER_CPUS) --dashboard-agent-listen-port=$$(( $(RAY_AGENT_PORT) + i )) \
			--disable-usage-stats || exit 1; \
	done
	echo $(RAY_UP_MARK) > $(RAY_UP_MARK).record
	@echo "cluster: RAY_ADDRESS=127.0.0.1:$(RAY_PORT), dashboard and job API http://127.0.0.1:$(RAY_DASHBOARD_PORT)"

# Stops the processes of the cluster ray-up started (those that carry its mark), not every Ray process of the machine.
ray-down: setup
	$(BIN)/python -m pipelines.local_cluster stop $(RAY_UP_MARK).record

## mlflow-ui: the repository's tracking store on http://127.0.0.1:5000
mlflow-ui: setup
	mkdir -p mlruns
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

bench: setup
	$(BIN)/asda bench step $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
