"""Code generated from protocol/functions.spec (protocol/gen_requests.py): not edited by hand."""
