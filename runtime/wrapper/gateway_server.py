"""The model gateway's HTTP endpoint on the container's 127.0.0.1 (the standard library's
http.server, one thread per connection, a bounded number of them). Imported by wrapper.py only
when the gateway is on, so other workers' wrappers start without it. The protocol (requests to
frames and back) is the core's; this is only the socket side."""

import http.server
import socketserver
import sys
import threading


class GatewayHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 600.0        # set per server below
    server_version = "corral-wrapper"

    def handle_one_request(self):
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():       # answers 400/431/505 itself
                return
            self.server.driver.serve_exchange(self)
            self.wfile.flush()
        except (OSError, ValueError):      # the client went away, or timed out
            self.close_connection = True

    def log_message(self, format, *args):  # the core logs what matters
        pass


class GatewayServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, driver, port, *, timeout_s, max_connections, log):
        self.driver = driver
        self.log = log
        self.slots = threading.BoundedSemaphore(max_connections)
        handler = type("Handler", (GatewayHandler,), {"timeout": timeout_s})
        http.server.HTTPServer.__init__(self, ("127.0.0.1", port), handler)

    def server_bind(self):
        # not HTTPServer's: it looks up the host's name (no DNS in a container without network)
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            return self._refuse(request)
        try:
            socketserver.ThreadingMixIn.process_request(self, request, client_address)
        except Exception:           # no thread (the pids limit): refuse it
            self.slots.release()
            self._refuse(request)

    def process_request_thread(self, request, client_address):
        try:
            socketserver.ThreadingMixIn.process_request_thread(self, request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request):
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n")
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        self.log("model gateway: error serving a connection: %s" % (sys.exc_info()[1],))
