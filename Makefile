# The two commands of the README: `make demo` (set-up, then the whole study on the embedded data) and
# `make test` (set-up, then the test suite). Both install everything they need first.
PY := .venv/bin/python
DATA := data/demo

.PHONY: setup test demo doctor lint clean-demo

setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q

$(DATA)/data.json: | setup
	$(PY) tools/make_data.py --out $(DATA) --scale small

demo: setup $(DATA)/data.json
	$(PY) tools/study.py configs/studies/demo.yaml --work-dir work_dirs/demo

doctor: setup
	$(PY) tools/doctor.py

lint: setup
	$(PY) -m ruff check .

clean-demo:
	rm -rf work_dirs/demo
