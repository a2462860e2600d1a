"""The `http` foundation-model backend: the public images go, batch by batch, to a server that
answers class probabilities (options in `raysim.models.foundation`). Apart from the other
backends because its rules for images leaving the process (transport, authentication, limits,
retries, redaction) change together; it registers on import.

HTTP protocol (one POST per batch, JSON both ways)::

    request:  {"shape": [N, C, H, W], "dtype": "uint8", "num_classes": K,
               "data": "<base64 of the images' raw C-order bytes>"}
    response: {"probabilities": [[p_0, ..., p_{K-1}], ...]}   # N rows, status 200
    errors:   any non-2xx status; its body (text) is shown to the user
    segmentation: the request also has "output": "maps"; "probabilities" is then
              N x K x H x W nested lists (a class-probability map per image and class)

The images leave the process, so the client is strict:

- Transport: `url` must be https:// (certificates are verified against the system's CAs;
  SSL_CERT_FILE names another bundle) unless its host is loopback (localhost, 127.0.0.0/8,
  ::1). A url with credentials (user:password@host) is refused: the config and provenance
  keep the url as written. Redirects are not followed (the Authorization header would go
  along); a 3xx answer is an error naming the new address. A loopback url is always asked
  directly, never through a proxy (http_proxy would see the images and the header in clear
  text); an https:// url goes through HTTPS_PROXY / https_proxy when set (a CONNECT tunnel:
  the proxy sees the host name, not the images nor the header; no_proxy excludes hosts).
- Authentication: `auth_env: FM_TOKEN` sends the value of the environment variable FM_TOKEN,
  as it is (e.g. "Bearer abc..."), as the Authorization header of every request. The variable
  must be set in the process that asks the model (the run's driver: on a cluster, the node the
  run starts from); only its name is in the config, the value is never shown or stored.
- Limits: an answer over `max_response_mb` (10^6 bytes) is refused (a larger Content-Length
  before reading, otherwise after cap + 1 bytes); `timeout` bounds each request, `deadline` all
  of them together.
- Retries: a connection error, a timeout, HTTP 429 or a 5xx other than 501/505 is retried up
  to `retries` times per batch, after `retry_delay` * 2^attempt seconds (at most 60; longer if
  the server sends Retry-After, honoured up to 60 s). Only the failed batch is asked again:
  the answered ones are kept. Other 4xx answers, invalid answers and oversized ones fail at
  once. A failure names how many batches had been answered.
- Messages: every message and the backend's label and repr show the url through `redact`:
  credentials and query parameters that look like secrets (token=, key=, sig=, ...) become
  ***; a server's error text is shown with the Authorization value blanked out.

A server needs only the standard library and numpy, e.g.::

    import base64, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import numpy as np

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = np.frombuffer(base64.b64decode(request["data"]), np.uint8).reshape(request["shape"])
            probs = my_model(images, request["num_classes"])  # yours: (N, K), rows sum to 1
            body = json.dumps({"probabilities": np.asarray(probs, float).tolist()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()

It listens on loopback only; to serve other machines, put it behind TLS (e.g. a reverse proxy
with a certificate) and have it check the Authorization header.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysim import console
from raysim.config import ConfigError
from raysim.models.foundation_base import (
    FoundationModel,
    FoundationModelError,
    check_positive,
    check_probabilities,
    check_probability_maps,
    register_foundation_model,
)

log = logging.getLogger(__name__)

# --- http: redaction, transport rules, retries -------------------------------------------------

SECRET_PARAM = re.compile(r"token|key|secret|sig|pass|pwd|auth|credential|session", re.IGNORECASE)
REDACTED = "***"
RETRY_STATUSES = frozenset({429, *range(500, 600)}) - {501, 505}  # 501/505: the server will never do it
MAX_WAIT = 60.0  # seconds: the longest pause between two tries, Retry-After included
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact(url: str) -> str:
    """`url` safe to show: credentials (user:password@) and the values of query or fragment
    parameters whose name looks like a secret (token, api_key, sig, password, ...) become ***.
    Works on the raw text, so a url urllib cannot parse is redacted too."""
    text = str(url)
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*@", lambda m: f"{m.group(1) or ''}//{REDACTED}@", text)

    def param(match: re.Match[str]) -> str:
        sep, key, value = match.group(1), match.group(2), match.group(3)
        return f"{sep}{key}={REDACTED}" if value and SECRET_PARAM.search(urllib.parse.unquote_plus(key)) else match.group(0)

    return re.sub(r"([?&;#])([^=&;#]*)=([^&;#]*)", param, text)


def is_loopback(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also IPv4-mapped): traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused (urllib would resend the Authorization header to the new host, even
    over plain http); the 3xx then reaches the caller as an HTTPError."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Retryable(Exception):
    """One try failed in a way that may pass: a connection error, a timeout, 429 or a 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = (headers.get("Retry-After") if headers is not None else None) or ""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


@register_foundation_model("http")
@dataclass(repr=False)
class HttpModel(FoundationModel):
    url: str
    timeout: float = 60.0  # seconds, each request
    batch_size: int = 64  # images per request
    max_response_mb: float = 64.0  # the largest answer read (10^6 bytes)
    deadline: float | None = 3600.0  # seconds for all batches, retries and waits included; None: no limit
    retries: int = 3  # further tries of a batch after a retryable failure
    retry_delay: float = 1.0  # seconds before the first retry, doubled each time (at most MAX_WAIT)
    auth_env: str | None = None  # name of the environment variable holding the Authorization header's value

    def __post_init__(self) -> None:
        shown = redact(self.url) if isinstance(self.url, str) else repr(self.url)
        parts = _split_url(self.url)
        host = parts.hostname if parts else None
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise ConfigError(f"foundation model 'http': url must be an http:// or https:// address (no spaces), got {shown}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"foundation model 'http': url {shown} carries credentials (user:password@); the run's config and provenance keep the url as written. "
                "Put the Authorization header's value in an environment variable and name it with option auth_env"
            )
        if parts.scheme == "http" and not is_loopback(host):
            raise ConfigError(
                f"foundation model 'http': url {shown} is plain http to {host}, which is not loopback: the images and answers would cross the network unencrypted. "
                "Use https:// (http:// is allowed for localhost, 127.0.0.0/8 and ::1 only)"
            )
        check_positive(self.label, "timeout", self.timeout)
        _check_count(self.label, "batch_size", self.batch_size, minimum=1)
        check_positive(self.label, "max_response_mb", self.max_response_mb)
        if self.deadline is not None:
            check_positive(self.label, "deadline", self.deadline)
        _check_count(self.label, "retries", self.retries, minimum=0)
        if not isinstance(self.retry_delay, (int, float)) or isinstance(self.retry_delay, bool) or not 0 <= self.retry_delay <= MAX_WAIT:
            raise ConfigError(f"{self.label}: option retry_delay must be a number of seconds from 0 to {MAX_WAIT:g}, got {self.retry_delay!r}")
        if self.auth_env is not None:
            if not isinstance(self.auth_env, str) or not ENV_NAME.fullmatch(self.auth_env):
                # Not echoed: a value here may be the secret itself, put where its variable's name belongs.
                raise ConfigError(f"{self.label}: option auth_env must be the name of an environment variable (letters, digits, _), not its value")
            self._authorization()  # set here, or an error now rather than after the run has started
        secrets = sorted({key for key in re.findall(r"[?&;#]([^=&;#]*)=[^&;#]", self.url) if SECRET_PARAM.search(urllib.parse.unquote_plus(key))})
        if secrets:
            log.warning("%s: the url carries what looks like a secret (%s); it is stored with the run's config as written: prefer option auth_env", self.label, ", ".join(secrets))

    @property
    def label(self) -> str:
        return f"foundation model 'http' at {redact(self.url)}"

    def __repr__(self) -> str:
        options = ", ".join(f"{f.name}={redact(self.url) if f.name == 'url' else getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({options})"

    answers_maps = True  # a segmentation run's requests say "output": "maps" (module docstring)

    def predict(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        return self._ask_all(images, num_classes, maps=False)

    def predict_maps(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        return self._ask_all(images, num_classes, maps=True)

    def _ask_all(self, images: np.ndarray, num_classes: int, *, maps: bool) -> np.ndarray:
        ends = None if self.deadline is None else time.monotonic() + self.deadline
        starts = range(0, len(images), self.batch_size)
        parts: list[np.ndarray] = []  # the answered batches: a retry asks again for the failed one only
        for start in starts:
            console.report(f"asking {self.label}, images", start, len(images))  # each batch a round trip: the bar moves with them
            batch = images[start : start + self.batch_size]
            where = f"{self.label} (images {start}..{start + len(batch) - 1})"
            done = f"{len(parts)} of {len(starts)} batches had been answered" + (f" (images 0..{start - 1})" if parts else "")
            answer = self._ask(json.dumps(encode_request(batch, num_classes, maps=maps)).encode(), where, done, ends)
            try:
                probs = _probabilities(answer, where)
            except FoundationModelError as err:  # it quotes the body, which may echo the request
                raise FoundationModelError(self._clean(str(err))) from None
            if maps:
                parts.append(check_probability_maps(probs, n=len(batch), num_classes=num_classes, size=(int(images.shape[2]), int(images.shape[3])), source=where))
            else:
                parts.append(check_probabilities(probs, n=len(batch), num_classes=num_classes, source=where))
        console.report(f"asking {self.label}, images", len(images), len(images))
        return np.concatenate(parts)

    def _ask(self, body: bytes, where: str, done: str, ends: float | None) -> bytes:
        """One batch's answer, retried with exponential backoff after a retryable failure."""
        for attempt in range(self.retries + 1):
            remaining = self._remaining(ends, where, done)
            try:
                return self._post(body, min(self.timeout, remaining), ends, where, done)
            except _Retryable as err:
                failure = str(err)
                wait = min(self.retry_delay * 2**attempt, MAX_WAIT)
                if err.retry_after is not None:
                    wait = max(wait, min(err.retry_after, MAX_WAIT))
            if ends is not None and time.monotonic() >= ends:
                raise FoundationModelError(f"{where}: {failure}; the deadline of {self.deadline:g} s for all batches passed (option deadline); {done}")
            if attempt == self.retries:
                break
            if ends is not None and time.monotonic() + wait >= ends:
                raise FoundationModelError(f"{where}: {failure}; no time left to wait {wait:.3g} s and retry within the deadline of {self.deadline:g} s (option deadline); {done}")
            log.warning("%s: %s; trying again in %.3g s (retry %d of %d)", where, failure, wait, attempt + 1, self.retries)
            time.sleep(wait)
        raise FoundationModelError(f"{where}: {failure}; gave up after {self.retries + 1} tries (option retries={self.retries}); {done}")

    def _remaining(self, ends: float | None, where: str, done: str) -> float:
        if ends is None:
            return float("inf")
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise FoundationModelError(f"{where}: the deadline of {self.deadline:g} s for all batches passed (option deadline); {done}")
        return remaining

    def _post(self, body: bytes, timeout: float, ends: float | None, where: str, done: str) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.auth_env is not None:
            headers["Authorization"] = self._authorization()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        # Every error is raised `from None` after its text is cleaned: a chained exception's
        # text (urllib's for a bad url) could show what the message hides.
        try:
            with _opener(self.url).open(request, timeout=timeout) as response:
                return self._read(response, ends, where, done)
        except urllib.error.HTTPError as err:  # before URLError: it is one
            with err:
                detail = self._clean(err.read(300).decode("utf-8", "replace").strip())
            message = f"the server answered HTTP {err.code} {err.reason}: {detail!r}"
            if err.code in RETRY_STATUSES:
                raise _Retryable(message, _retry_after(err.headers)) from None
            if 300 <= err.code < 400:
                location = err.headers.get("Location") if err.headers is not None else None
                message += f"; redirects are not followed (the Authorization header would go along): set url to the final address ({redact(location or '?')})"
            raise FoundationModelError(f"{where}: {message}; {done}") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ssl.SSLError):  # a certificate that does not verify will not verify on the next try
                hint = "; the server's certificate must verify against the system's CAs (SSL_CERT_FILE names another bundle)" if isinstance(reason, ssl.SSLCertVerificationError) else ""
                raise FoundationModelError(f"{where}: TLS failed ({self._clean(str(reason))}){hint}; {done}") from None
            if isinstance(reason, TimeoutError):
                raise _Retryable(self._timed_out(timeout)) from None
            raise _Retryable(f"cannot reach {redact(self.url)} ({self._clean(str(reason))})") from None
        except TimeoutError:
            raise _Retryable(self._timed_out(timeout)) from None
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"the connection to {redact(self.url)} failed ({type(err).__name__}: {self._clean(str(err))})") from None

    def _read(self, response: Any, ends: float | None, where: str, done: str) -> bytes:
        """The body, at most max_response_mb: a larger Content-Length is refused unread, a longer
        body is cut after cap + 1 bytes. read1 returns what has arrived, so the deadline holds
        against a server that trickles its answer."""
        cap = int(self.max_response_mb * 1_000_000)
        too_big = f"over the {self.max_response_mb:g} MB cap (option max_response_mb)"
        length = (response.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > cap:
            raise FoundationModelError(f"{where}: the server announced an answer of {int(length)} bytes (Content-Length), {too_big}; not read")
        chunks, size = [], 0
        while size <= cap:
            self._remaining(ends, where, done)
            chunk = response.read1(min(1 << 16, cap + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise FoundationModelError(f"{where}: the server's answer is {too_big}; stopped reading after {size} bytes")

    def _timed_out(self, timeout: float) -> str:
        return f"no answer from {redact(self.url)} within {timeout:.3g} s (option timeout{', shortened by option deadline' if timeout < self.timeout else ''})"

    def _authorization(self) -> str:
        """The Authorization header's value, read from the environment at each use (never kept)."""
        name = self.auth_env or ""
        value = os.environ.get(name, "")
        if not value.strip():
            raise ConfigError(
                f"{self.label}: option auth_env names the environment variable {name}, which is {'empty' if name in os.environ else 'not set'} in this process (host {socket.gethostname()}); set it to the Authorization header's value, e.g. 'Bearer <token>', where the run's driver starts"
            )
        if any(c in value for c in "\r\n\x00"):
            raise ConfigError(f"{self.label}: the environment variable {name} (option auth_env) holds a line break; it must be one header value")
        return value

    def _clean(self, text: str) -> str:
        """`text` (a server's error body, an exception's message) without the url's secrets or the
        Authorization value: servers that echo the request must not print them."""
        secrets = []
        if self.auth_env and os.environ.get(self.auth_env, "").strip():
            value = os.environ[self.auth_env]
            secrets += [value, value.partition(" ")[2]]  # "Bearer abc": also "abc" alone
        for key, value in re.findall(r"[?&;#]([^=&;#]*)=([^&;#]*)", self.url):
            if SECRET_PARAM.search(urllib.parse.unquote_plus(key)):
                secrets += [value, urllib.parse.unquote_plus(value)]
        text = text.replace(self.url, redact(self.url))
        for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text


_OPENER = urllib.request.build_opener(_NoRedirect)  # https: the proxy variables apply (a CONNECT tunnel, TLS end to end)
# Loopback never goes through a proxy: http_proxy would otherwise get the images and the
# Authorization header in clear text (urllib proxies 127.0.0.1 too unless no_proxy names it).
_DIRECT = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def _opener(url: str) -> urllib.request.OpenerDirector:
    """The opener for `url`: direct to a loopback host, else through the environment's proxies."""
    parts = _split_url(url)
    return _DIRECT if parts is not None and is_loopback(parts.hostname) else _OPENER


def _split_url(url: Any) -> urllib.parse.SplitResult | None:
    """The parts of an absolute url without whitespace or control characters; None otherwise."""
    if not isinstance(url, str) or re.search(r"[\s\x00-\x1f\x7f]", url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a port that is not a number raises here, not at the first request
    except ValueError:
        return None
    return parts


def _check_count(label: str, key: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{label}: option {key} must be an integer >= {minimum}, got {value!r}")


def encode_request(images: np.ndarray, num_classes: int, *, maps: bool = False) -> dict[str, Any]:
    """The JSON body of one HTTP request (see the module docstring); `maps`: a segmentation run's."""
    data = base64.b64encode(np.ascontiguousarray(images).tobytes()).decode("ascii")
    request = {"shape": list(images.shape), "dtype": "uint8", "data": data, "num_classes": num_classes}
    return {**request, "output": "maps"} if maps else request


def _probabilities(raw: bytes, where: str) -> Any:
    try:
        answer = json.loads(raw)
    except ValueError as err:
        raise FoundationModelError(f"{where} answered with invalid JSON ({err}): {raw[:200]!r}") from err
    if not isinstance(answer, dict) or "probabilities" not in answer:
        got = f"keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
        raise FoundationModelError(f'{where} answered {got}; expected a JSON object {{"probabilities": [[...], ...]}}')
    return answer["probabilities"]
