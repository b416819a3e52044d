"""Study storage: a URL's password is hidden in the form SQLAlchemy connects with, in every message and file."""

import pytest

from effcifar.cli import main
from effcifar.config import save_config
from effcifar.hpo.study import HpoConfig
from effcifar.studies import is_storage_url, redact_text, redact_url, spellings

SECRET = "123/SECRET?PW#x"


@pytest.mark.parametrize("url, redacted", [
    ("postgresql://alice:123/SECRETPW@localhost/x", "postgresql://alice@localhost/x"),
    ("postgresql://alice:p#SECRETPW?@db:5433/x", "postgresql://alice@db:5433/x"),
    ("postgresql+psycopg://alice@db/x?sslmode=require&PassWord=SECRETPW&sslpassword=SECRETPW",
     "postgresql+psycopg://alice@db/x?sslmode=require"),
    ("postgresql://alice:p%2FSECRETPW@db/x", "postgresql://alice@db/x"),
    ("mysql://alice:123/SECRETPW@db/x", "mysql://alice@db/x"),
    ("postgresql://alice:SECRETPW@db:notaport/x", "<not a URL>"),
    ("alice:SECRETPW", "<not a URL>"),
])
def test_redaction_removes_the_password_sqlalchemy_would_send(url, redacted):
    assert redact_url(url) == redacted
    assert "SECRETPW" not in redact_text(f"failed for {url}", url)


def test_only_postgresql_urls_with_a_port_in_range_are_storage():
    assert is_storage_url("postgresql://alice:123/SECRETPW@localhost/x")
    assert not is_storage_url("postgresql://alice@localhost:99999/x")
    assert not is_storage_url("mysql://alice@localhost/x")


@pytest.mark.parametrize("args", [
    ["hpo", "run", "--space", "examples/search_space.json", "--dataset", "synthetic", "--out", "{tmp}/run",
     "--storage"],
    ["hpo", "status", "{tmp}/saved", "--storage"],
    ["pipeline", "--show-config", "--set"],
])
@pytest.mark.parametrize("url", [
    f"postgresql://alice:{SECRET}@localhost:1/x",  # nothing listens on port 1: a connection error
    f"postgresql://alice:{SECRET}@localhost:99999/x",  # refused before connecting
    f"mysql://alice:{SECRET}@localhost/x",
])
def test_no_command_prints_a_password_with_url_delimiters(tmp_path, capsys, args, url):
    args = [a.format(tmp=tmp_path) for a in args]
    save_config(HpoConfig(space="examples/search_space.json", storage="postgresql://alice@localhost:1/x"),
                tmp_path / "saved" / "hpo.yaml")
    main([*args, f"hpo.storage={url}" if args[0] == "pipeline" else url])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "alice" in printed
    assert not any(form in printed for form in spellings(SECRET) | {"SECRET"}), printed
