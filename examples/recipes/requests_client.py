"""Fetch a URL through proxy-pool with `requests`, reporting every outcome.

Each attempt asks the pool for a proxy, sends the request through it, and
tells the pool whether the proxy worked (POST /feedback), so the pool learns
which proxies suit this application. A failed attempt is retried with another
proxy.

    python3 requests_client.py --pool http://127.0.0.1:8080 --source my_app URL

Needs `requests` (and `pysocks`, i.e. `requests[socks]`, for socks proxies).
The pool's token, if it has one, comes from --token or PROXY_POOL_TOKEN.
"""

import argparse
import os
import sys
import time

import requests

# Answers that say the proxy (or its exit address) is the problem rather than
# the target: proxy errors, and the target refusing or throttling this exit
# address. Tune for your target.
PROXY_FAILURE_STATUSES = {403, 407, 429, 502, 503, 504}


class NoProxy(Exception):
    """The pool has no eligible proxy now (503)."""


class ProxyPool:
    """A small client of proxy-pool's get-proxy and feedback endpoints."""

    def __init__(self, base_url, source, token=None, timeout=5.0):
        self.base_url = base_url.rstrip("/")
        self.source = source
        self.session = requests.Session()
        self.timeout = timeout
        if token:
            self.session.headers["Authorization"] = "Bearer " + token

    def get_proxy(self, **filters):
        """The proxy URL to use, exactly as the pool gave it."""
        params = {"source": self.source}
        params.update({k: v for k, v in filters.items() if v is not None})
        answer = self.session.get(
            self.base_url + "/get-proxy", params=params, timeout=self.timeout
        )
        if answer.status_code == 503:
            raise NoProxy(answer.json().get("reason", "unknown"), answer.headers.get("Retry-After"))
        answer.raise_for_status()
        return answer.json()["proxy"]

    def feedback(self, proxy, success):
        """Reports an outcome; `proxy` exactly as get_proxy returned it."""
        answer = self.session.post(
            self.base_url + "/feedback",
            json={"source": self.source, "proxy": proxy, "success": bool(success)},
            timeout=self.timeout,
        )
        answer.raise_for_status()
        return answer.json()


def client_proxy_url(proxy):
    """The URL to give an HTTP library. The pool's `https` proxies are plain
    HTTP proxies that also tunnel CONNECT, while libraries read an https://
    proxy URL as "speak TLS to the proxy"; so they are handed over as http://.
    """
    if proxy.startswith("https://"):
        return "http://" + proxy[len("https://"):]
    return proxy


def fetch(pool, url, attempts=5, timeout=10.0, log=sys.stderr):
    """GETs `url` through pool proxies until one works or `attempts` run out.
    Returns the response, or raises the last error."""
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            proxy = pool.get_proxy(https="true" if url.startswith("https:") else None)
        except NoProxy as none:
            reason, retry_after = none.args
            last_error = none
            wait = min(int(retry_after or 1), 30)
            print(f"attempt {attempt}: no proxy ({reason}), waiting {wait} s", file=log)
            time.sleep(wait)
            continue
        via = client_proxy_url(proxy)
        try:
            response = requests.get(
                url, proxies={"http": via, "https": via}, timeout=timeout
            )
            worked = response.status_code not in PROXY_FAILURE_STATUSES
            if not worked:
                last_error = RuntimeError(f"HTTP {response.status_code} through {proxy}")
        except requests.RequestException as error:
            response, worked, last_error = None, False, error
        pool.feedback(proxy, worked)
        print(
            f"attempt {attempt}: {proxy} {'worked' if worked else 'failed: ' + str(last_error)}",
            file=log,
        )
        if worked:
            return response
    raise last_error or RuntimeError("no attempt made")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--pool", default="http://127.0.0.1:8080")
    parser.add_argument("--source", default="requests_client")
    parser.add_argument("--token", default=os.environ.get("PROXY_POOL_TOKEN"))
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    pool = ProxyPool(args.pool, args.source, args.token)
    try:
        response = fetch(pool, args.url, args.attempts, args.timeout)
    except Exception as error:  # noqa: BLE001 - report whatever ended the last attempt
        print(f"giving up: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(response.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
