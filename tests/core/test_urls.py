"""stem._urls: credentials never shown, whatever the URL looks like."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from stem._urls import mask_url, mask_urls_in, redact

PW = "s3cr3t-Pa55"


@pytest.mark.parametrize("url,masked", [
    ("redis://:s3cr3t-Pa55@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://default:s3cr3t-Pa55@cache.example:6380/1", "rediss://default:***@cache.example:6380/1"),
    ("postgresql://app:s3cr3t-Pa55@db.example:5432/app?sslmode=require",
     "postgresql://app:***@db.example:5432/app?sslmode=require"),
    ("postgres://app:s3cr3t%40Pa55@db/app", "postgres://app:***@db/app"),
    ("redis+sentinel://:s3cr3t-Pa55@s1:26379,s2:26379,[::1]:26379/mymaster/0",
     "redis+sentinel://:***@s1:26379,s2:26379,[::1]:26379/mymaster/0"),
    ("redis+sentinel://s1:26379/m?sentinel_password=s3cr3t-Pa55&ssl=1",
     "redis+sentinel://s1:26379/m?sentinel_password=***&ssl=1"),
    ("postgresql://app@db/app?password=s3cr3t-Pa55", "postgresql://app@db/app?password=***"),
    ("postgresql://app@db/app?sslmode=verify-full&sslpassword=s3cr3t-Pa55",
     "postgresql://app@db/app?sslmode=verify-full&sslpassword=***"),
    ("redis://h/0?Token=s3cr3t-Pa55;db=1", "redis://h/0?Token=***;db=1"),
    # no secret: unchanged
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
    ("sqlite:///.stem/stem.db", "sqlite:///.stem/stem.db"),
    ("sqlite:////var/lib/stem/stem.db", "sqlite:////var/lib/stem/stem.db"),
    ("memory://", "memory://"),
    ("redis://h/0?client_name=me@home", "redis://h/0?client_name=me@home"),
    ("", ""),
    ("<object>", "<object>"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", [
    # malformed: unescaped / ? # @ in the password; masked up to the last "@"
    "redis://:s3c/r3t-Pa55@127.0.0.1:6379/0",
    "redis://u:s3c?r3t-Pa55@h/0",
    "redis://u:s3c#r3t-Pa55@h/0",
    "postgresql://u:s3c@r3t/Pa55@db/app",
    "postgresql://u:s3cr3t-Pa55@db:x/app",
    "postgresql://u@db/app?password=s3cr3t&Pa55",  # an unescaped "&" in a query password
    "postgresql://u@db/app?password=s3cr3t#Pa55",
    # no scheme, or no "//"
    "u:s3cr3t-Pa55@db",
    "redis:s3cr3t-Pa55@db",
    "host=db user=u password=s3cr3t-Pa55",
    "redis://:s3cr3t-Pa55@[::1",
    "amqp://guest:s3cr3t-Pa55@broker//",
])
def test_malformed_urls_never_leak(url: str) -> None:
    out = mask_url(url)
    for piece in ("s3cr3t", "Pa55", "r3t"):
        assert piece not in out, out
    assert "***" in out


def test_user_name_and_host_are_kept() -> None:
    out = mask_url("postgresql://reporting:s3cr3t@db.internal:6543/sales")
    assert out == "postgresql://reporting:***@db.internal:6543/sales"


def test_mask_urls_in_free_text_and_redact_known_secrets() -> None:
    text = ("could not connect to 'redis://:s3cr3t-Pa55@h:1/0' (dsn host=h password=hunter22) "
            "and to postgresql://u:pw22@db/app")
    out = mask_urls_in(text)
    assert "s3cr3t-Pa55" not in out and "hunter22" not in out and "pw22" not in out
    assert "redis://:***@h:1/0" in out and "password=***" in out
    # a driver quoting the password on its own (not inside a URL)
    said = redact("auth failed for s3cr3t-Pa55 (decoded: s3cr3t@Pa55)",
                  "redis://:s3cr3t%40Pa55@h/0", "redis://:s3cr3t-Pa55@h/0")
    assert "s3cr3t" not in said


def test_never_raises_on_garbage() -> None:
    for junk in ("://", "@", ":@", "a:b:c@", "?password", "[", "redis://[", "%zz@:", "\x00:\x00@"):
        assert isinstance(mask_url(junk), str)
        assert isinstance(mask_urls_in(junk), str)


# -- property: for any password, the password is not in the output -------------------------

USERINFO_TEMPLATES = [
    "redis://:{pw}@127.0.0.1:6379/0",
    "rediss://default:{pw}@cache.example:6380/1",
    "postgresql://app:{pw}@db.example:5432/app?sslmode=require",
    "postgres://app:{pw}@db",
    "redis+sentinel://:{pw}@s1:26379,s2:26379,s3:26379/mymaster/0?ssl=1",
    "{pw_user}:{pw}@db.example",
]
QUERY_TEMPLATES = [
    "postgresql://app@db/app?sslmode=require&password={pw}",
    "postgresql://app@db/app?sslpassword={pw}&sslmode=verify-full",
    "redis+sentinel://s1:26379/mymaster?sentinel_password={pw}&ssl=1",
    "redis://h:6379/0?token={pw}",
]
passwords = st.text(min_size=4, max_size=40).filter(lambda s: s.strip() == s)


def _check(template: str, pw: str) -> None:
    url = template.format(pw=pw, pw_user="app")
    skeleton = template.format(pw="***", pw_user="app")
    assume(pw not in skeleton)
    out = mask_url(url)
    assert pw not in out, (url, out)


@given(pw=passwords, template=st.sampled_from(USERINFO_TEMPLATES + QUERY_TEMPLATES))
@example(pw="p@ss/w?rd#1", template=USERINFO_TEMPLATES[0])
def test_percent_encoded_password_never_appears(pw: str, template: str) -> None:
    _check(template, quote(pw, safe=""))


@given(pw=passwords, template=st.sampled_from(USERINFO_TEMPLATES))
@example(pw="a/b@c?d#e:f", template=USERINFO_TEMPLATES[2])
@example(pw="12/34", template=USERINFO_TEMPLATES[1])
def test_raw_password_in_userinfo_never_appears(pw: str, template: str) -> None:
    """Unescaped reserved characters make the URL malformed; still nothing leaks."""
    _check(template, pw)


@given(pw=passwords.filter(lambda s: not ("=" in s and ("&" in s or ";" in s))),
       template=st.sampled_from(QUERY_TEMPLATES))
@example(pw="ab&cd", template=QUERY_TEMPLATES[0])
@example(pw="ab#cd", template=QUERY_TEMPLATES[1])
def test_raw_password_in_query_never_appears(pw: str, template: str) -> None:
    """(An unescaped '&' followed by 'name=value' is a second parameter; not generated.)"""
    _check(template, pw)


@given(st.text())
def test_mask_url_is_total(s: str) -> None:
    assert isinstance(mask_url(s), str)
    assert isinstance(mask_urls_in(s), str)


def test_config_repr_and_the_transactional_enqueue_error_are_masked() -> None:
    import asyncio

    import stem
    from stem.config import StemConfig

    cfg = StemConfig(broker_url="redis://:hunter2@h/0", backend_url="postgresql://u:hunter2@h/d")
    assert "hunter2" not in repr(cfg) and "***" in repr(cfg)
    app = stem.Stem("t", broker="redis://:hunter2@127.0.0.1:1/0")

    @app.task(name="t.x")
    async def x() -> None: ...

    with pytest.raises(stem.ConfigurationError) as info:
        asyncio.run(app.enqueue("t.x", connection=object()))
    assert "hunter2" not in str(info.value)
