"""The committed protobuf modules must match the .proto they are generated from."""

from __future__ import annotations

from runtime.api import codegen


def test_generated_code_is_up_to_date(tmp_path):
    codegen.generate(tmp_path)
    for name in codegen.FILES:
        assert (tmp_path / name).read_text() == (codegen.OUT / name).read_text(), (
            f"{name} is stale: run `python -m runtime.api.codegen`"
        )
