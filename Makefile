# The two commands of the quick start: `make train` and `make test`.
# Each creates .venv on first use and installs with the pinned torch from constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The memorizing and block-recurrent reference packages pull faiss-gpu and CUDA wheels;
# they are test oracles only, so they go in without dependencies (what they import is
# already in the dev extra or the runtime set).
REFERENCE_NODEPS := memorizing-transformers-pytorch==0.4.1 block-recurrent-transformer-pytorch==0.4.4

.PHONY: train test bench bench-context lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,hf]"
	$(BIN)/pip install -q -c constraints.txt --no-deps $(REFERENCE_NODEPS)
	$(BIN)/pip install -q -c constraints.txt beartype joblib einops-exts
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/longrange train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerates the CPU results, plots and README tables (about 100 minutes on 2 quiet cores; time
# nothing else meanwhile). The linear-cost families also run at 32K-128K (vanilla, quadratic,
# stops at 16K); the speed pass times the reference packages beside their families at 4K and
# 8K (the Performer reference needs 5 GB at 4K and 10 GB at 8K, causal) and every
# reference-named class at the reference defaults, the non-causal Performer, Routing and
# Sinkhorn classes also at their packages' own defaults; the compile pass times torch.compile beside eager at 2K;
# the growth pass times each linear family at 16K and 64K in turn in one process (the ratio the
# performance aims ask for); the knn pass times memorizing's chunk as its kNN memory fills (0, 32K,
# 250K entries); the generate pass also times the compiled decoding steps (compiling sinkhorn's
# step graphs alone takes about 4 minutes here).
BENCH_LENGTHS ?= 1024,2048,4096,8192,16384
LONG_LENGTHS ?= 32768,65536,131072
LINEAR_FAMILIES = performer,routing,sinkhorn,block_recurrent,memorizing
bench: $(STAMP)
	$(BIN)/longrange bench speed --models vanilla --lengths $(BENCH_LENGTHS) --repeats 2
	$(BIN)/longrange bench speed --models $(LINEAR_FAMILIES) --lengths $(BENCH_LENGTHS),$(LONG_LENGTHS) \
		--repeats 2 --compare-reference --reference-lengths 4096,8192
	$(BIN)/longrange bench growth --models $(LINEAR_FAMILIES) --lengths 16384,65536 --repeats 5
	$(BIN)/longrange bench speed --models all --lengths 2048 --repeats 3 --compile
	$(BIN)/longrange bench knn --lengths 0,32768,250000 --compare-reference --repeats 15
	$(BIN)/longrange bench generate --models all --prompt-len 1024 --new-tokens 1024 --compile
	$(BIN)/longrange bench recall --models all --steps 300
	$(BIN)/longrange bench quality --models all --steps 300
	$(BIN)/longrange bench report

# The long-context evidence (loss by position, each mechanism against its ablation over two
# seeds, recall at 256-16K tokens, equal compute at 4K) with its plots and README section: about
# an hour on 2 quiet cores. The budgets are training seconds per run, turned into steps per
# family by timing them on the machine; both are recorded with every result.
CONTEXT_BUDGET ?= 60
CONTEXT_RECALL_BUDGET ?= 100
bench-context: $(STAMP)
	$(BIN)/longrange bench context --models all --budget $(CONTEXT_BUDGET) \
		--recall-budget $(CONTEXT_RECALL_BUDGET) --seeds 0,1
	$(BIN)/longrange bench report

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
