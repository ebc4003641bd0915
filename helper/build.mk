# The helper's cffi module, compiled against the system's Cryptoki headers into the
# cache (python3 -m p11p.helper.ffi prints where). `make build` depends on it.
.PHONY: helper-cffi
helper-cffi:
	@$(PYTHON) -m pip install -q --root-user-action=ignore --no-deps -e . --config-settings editable_mode=strict
	@$(PYTHON) -m p11p.helper.ffi >/dev/null
