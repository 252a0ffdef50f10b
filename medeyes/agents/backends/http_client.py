"""The one way MedEyes opens an HTTP URL: ``urllib``, with no proxy for an address on this machine.

``urllib.request.urlopen`` sends every request through ``$http_proxy`` unless ``$no_proxy`` names the host, and
nothing names 127.0.0.1 by default: a proxy variable (set for pip on a cluster, or by someone else) rerouted
the trainer's calls to its own ``vllm serve``, weight syncs included, through a machine that could read or
answer them. A loopback URL never leaves the machine, so it never uses a proxy; any other URL follows the
environment as before.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from http.client import HTTPResponse

from medeyes_env.net import is_loopback

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_url(request: urllib.request.Request | str, timeout: float) -> HTTPResponse:
    """``urllib.request.urlopen(request, timeout=timeout)``, without any proxy when the URL is a loopback one."""
    url = request if isinstance(request, str) else request.full_url
    if is_loopback(urllib.parse.urlsplit(url).hostname):
        return _DIRECT.open(request, timeout=timeout)  # type: ignore[no-any-return]
    return urllib.request.urlopen(request, timeout=timeout)  # type: ignore[no-any-return]
