"""A Scrapy downloader middleware that routes requests through proxy-pool
and reports every outcome back to it.

settings.py:

    DOWNLOADER_MIDDLEWARES = {
        "scrapy_middleware.ProxyPoolMiddleware": 610,
    }
    PROXY_POOL_URL = "http://127.0.0.1:8080"
    PROXY_POOL_SOURCE = "my_spider"
    PROXY_POOL_TOKEN = None        # the pool's api_token, if set
    PROXY_POOL_MAX_RETRIES = 3     # new proxies tried for one request

Each request gets a proxy from GET /get-proxy (with https=true for https://
URLs). A response reports success unless its status says the proxy or its
exit address is the problem (PROXY_FAILURE_STATUSES); a download error
reports failure. A failed request is retried with another proxy, up to
PROXY_POOL_MAX_RETRIES times. Scrapy speaks only HTTP to proxies, so only
http and https (CONNECT-capable) proxies are asked for.

The pool is called with urllib, synchronously: get-proxy and feedback answer
from memory in well under a millisecond on a local network. Only the
standard library is imported, so the class can be used (and tested) without
Scrapy itself.
"""

import json
import logging
import urllib.error
import urllib.parse
import urllib.request

logger = logging.getLogger(__name__)

PROXY_FAILURE_STATUSES = {403, 407, 429, 502, 503, 504}
META_PROXY = "proxy_pool_proxy"
META_RETRIES = "proxy_pool_retries"


def client_proxy_url(proxy):
    """The pool's `https` proxies are plain HTTP proxies that also tunnel
    CONNECT; an https:// proxy URL would mean TLS to the proxy, so they are
    handed over as http://. Feedback uses the pool's URL unchanged."""
    if proxy.startswith("https://"):
        return "http://" + proxy[len("https://"):]
    return proxy


class ProxyPoolMiddleware:
    def __init__(self, pool_url, source, token=None, max_retries=3, timeout=5.0):
        self.pool_url = pool_url.rstrip("/")
        self.source = source
        self.token = token
        self.max_retries = max_retries
        self.timeout = timeout

    @classmethod
    def from_crawler(cls, crawler):
        settings = crawler.settings
        return cls(
            settings.get("PROXY_POOL_URL", "http://127.0.0.1:8080"),
            settings.get("PROXY_POOL_SOURCE", crawler.spider.name if crawler.spider else "scrapy"),
            settings.get("PROXY_POOL_TOKEN"),
            settings.getint("PROXY_POOL_MAX_RETRIES", 3),
        )

    # -- the pool's API ---------------------------------------------------

    def _call(self, method, path, body=None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(self.pool_url + path, data, headers, method=method)
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:
            return json.load(answer)

    def get_proxy(self, https):
        # Scrapy cannot use socks proxies: ask for http ones, which include
        # those that tunnel CONNECT when https=true is given.
        query = {"source": self.source, "protocol": "http"}
        if https:
            query["https"] = "true"
        return self._call("GET", "/get-proxy?" + urllib.parse.urlencode(query))["proxy"]

    def feedback(self, proxy, success):
        try:
            self._call("POST", "/feedback", {"source": self.source, "proxy": proxy, "success": success})
        except (urllib.error.URLError, OSError, ValueError) as error:
            # Losing one report must not lose the page.
            logger.warning("proxy-pool feedback failed: %s", error)

    # -- the middleware ---------------------------------------------------

    def process_request(self, request, spider=None):
        if "proxy" in request.meta and META_PROXY not in request.meta:
            return None  # the spider chose its own proxy
        try:
            proxy = self.get_proxy(request.url.startswith("https:"))
        except urllib.error.HTTPError as error:
            # 503: nothing eligible now; the request goes out directly
            # rather than failing the crawl.
            logger.warning("proxy-pool has no proxy (%s): fetching %s directly", error.code, request.url)
            request.meta.pop("proxy", None)
            request.meta.pop(META_PROXY, None)
            return None
        request.meta[META_PROXY] = proxy
        request.meta["proxy"] = client_proxy_url(proxy)
        return None

    def process_response(self, request, response, spider=None):
        proxy = request.meta.get(META_PROXY)
        if proxy is None:
            return response
        worked = response.status not in PROXY_FAILURE_STATUSES
        self.feedback(proxy, worked)
        if worked:
            return response
        return self._retry(request, response)

    def process_exception(self, request, exception, spider=None):
        proxy = request.meta.get(META_PROXY)
        if proxy is None:
            return None
        self.feedback(proxy, False)
        logger.info("proxy %s failed on %s: %s", proxy, request.url, exception)
        return self._retry(request, None)

    def _retry(self, request, response):
        """Another try with a fresh proxy, or `response` (None: let the
        exception propagate) when the retries are used up."""
        retries = request.meta.get(META_RETRIES, 0)
        if retries >= self.max_retries:
            return response
        meta = dict(request.meta)
        meta[META_RETRIES] = retries + 1
        meta.pop(META_PROXY, None)
        meta.pop("proxy", None)
        return request.replace(meta=meta, dont_filter=True)
