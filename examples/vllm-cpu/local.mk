# local.mk: your additions to the Makefile. This file is yours: `copier update` never
# overwrites it, and the Makefile includes it last (`-include local.mk`), so targets and
# variables defined here extend or override the template's. Examples:
#
# PYTHON := python3.12
# IMAGE := registry.example.com/my-team/my-backend:dev
#
# .PHONY: bench
# bench: install  ## my own target
# 	$(PY) -m my_benchmarks
