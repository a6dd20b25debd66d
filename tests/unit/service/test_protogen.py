"""The committed gRPC stubs match what protoc generates from proto/ today."""

from service import protogen


def test_committed_stubs_are_fresh() -> None:
    assert protogen.main(["--check"]) == 0, "run `python -m service.protogen`"


def test_check_detects_a_stale_stub(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "_gen"
    stale.mkdir()
    (stale / "__init__.py").write_text("")
    monkeypatch.setattr(protogen, "GEN_DIR", stale)
    assert protogen.main(["--check"]) == 1
