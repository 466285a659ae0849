// HTTP/1.1 for Mattermost's two calls, without node:http's objects per request.
//
// Why: node:http builds an IncomingMessage, a ServerResponse, header objects and streams for
// every request. On our 2-core machines a node:http server that does nothing but answer OK
// tops out at 25 000 – 28 000 requests/s with its thread at 100%: ~37 µs a request, more than
// half of what the relay spent on a notification (bench/README.md). Reading the request off the
// socket here costs a few µs of that.
//
// What is served here is exactly the shape Mattermost's Go client sends (contract §1.1):
// `POST <API path> HTTP/1.1`, one Host, a Content-Length body within the limit, plain header
// lines.
// Anything else (another path or method, a chunked body, Expect: 100-continue, HTTP/1.0, a
// malformed or oversized head, a body over the limit) is handed to node:http from the first
// byte of that request on, and the connection stays with node:http for the rest of its life.
// So every byte is read by one parser, and this one accepts only what it fully understands;
// node:http answers the rest as it always did (400, 413, 431, the operator endpoints ...).
import { createServer, STATUS_CODES, type RequestListener, type Server } from 'node:http';
import type { Socket } from 'node:net';

/** What an API call answers, as bytes on the wire. */
export type Reply = { status: number; type: string; body: string; headers?: Readonly<Record<string, string>> };

/** Serves one API call: the body as text, and the two headers the API reads. */
export type Route = (body: string, authorization: string | undefined, userAgent: string | undefined) => Promise<Reply>;

export type HttpOptions = {
  /** Paths served here when POSTed; everything else goes to `fallback`. */
  routes: ReadonlyMap<string, Route>;
  /** The node:http listener for everything that is not a plain API call. */
  fallback: RequestListener;
  bodyLimit: number;
  /** How long an idle keep-alive connection is kept. */
  keepAliveTimeout: number;
  /** How long a client may take to send a request's head (slowloris bound). */
  headersTimeout: number;
  /** How long a client may take to send a whole request. */
  requestTimeout: number;
};

export type HttpServer = {
  server: Server;
  /** Closes idle connections now; busy ones close once they have their answer. */
  closeIdleConnections(): void;
  closeAllConnections(): void;
};

/** node:http's default limit on a request head (--max-http-header-size). */
const MAX_HEAD = 16 * 1024;
/** Bytes a client may send ahead of our answers (pipelining) before we stop reading. */
const MAX_AHEAD = 64 * 1024;
const CRLFCRLF = Buffer.from('\r\n\r\n');
const LF = 10;
const LFLF = Buffer.from('\n\n');
/**
 * The header lines of a head (after the request line, with a final CRLF added): each a token
 * name, a colon, and a value of visible characters, spaces and tabs (RFC 9110 §5.1, §5.5). No
 * obs-fold, no bare CR or LF, no control characters.
 */
const HEADER_LINES = /^(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*$/;
const OWS = /^[ \t]+|[ \t]+$/g;

type Head = {
  route: Route;
  bodyStart: number;
  length: number;
  authorization: string | undefined;
  userAgent: string | undefined;
  close: boolean;
};
const INCOMPLETE = 'incomplete';
const OTHER = 'other';

/**
 * Reads a request head at the start of `buf`: ours, not ours (`OTHER`: node:http's to
 * serve or refuse), or not all there yet.
 */
export function parseHead(buf: Buffer, routes: ReadonlyMap<string, Route>, bodyLimit: number): Head | typeof INCOMPLETE | typeof OTHER {
  const end = buf.indexOf(CRLFCRLF);
  if (end < 0) {
    // Not ours to wait for: too long, not a POST, or lines ended by a bare LF.
    if (buf.length > MAX_HEAD || !buf.subarray(0, 5).equals(POST.subarray(0, Math.min(5, buf.length))) || buf.includes(LFLF)) return OTHER;
    return INCOMPLETE;
  }
  if (end > MAX_HEAD) return OTHER;
  const head = buf.toString('latin1', 0, end);
  const lineEnd = head.indexOf('\r\n');
  if (lineEnd < 0 || !head.startsWith('POST /')) return OTHER;
  const space = head.indexOf(' ', 5);
  if (space < 0 || space > lineEnd || head.slice(space, lineEnd) !== ' HTTP/1.1') return OTHER;
  const route = routes.get(head.slice(5, space));
  if (!route) return OTHER;

  if (!HEADER_LINES.test(head.slice(lineEnd + 2) + '\r\n')) return OTHER;

  let length = -1;
  let authorization: string | undefined;
  let userAgent: string | undefined;
  let close = false;
  let hosts = 0;
  for (let i = lineEnd + 2; i < end; ) {
    let j = head.indexOf('\r\n', i);
    if (j < 0) j = end;
    const colon = head.indexOf(':', i);
    // Only a few names matter here; their lengths sort out the rest without building strings.
    const size = colon - i;
    if (size === 4 || size === 6 || size === 7 || size === 10 || size === 13 || size === 14 || size === 17) {
      const value = head.slice(colon + 1, j).replace(OWS, '');
      switch (head.slice(i, colon).toLowerCase()) {
        case 'host':
          hosts++;
          break;
        case 'content-length':
          // One plain decimal length: anything else is a smuggling risk, and node:http's to refuse.
          if (length >= 0 || !/^\d{1,15}$/.test(value)) return OTHER;
          length = Number(value);
          break;
        case 'transfer-encoding':
        case 'expect':
        case 'upgrade':
          return OTHER;
        case 'connection': {
          const tokens = value.toLowerCase().split(',').map((t: string) => t.trim());
          if (tokens.includes('upgrade')) return OTHER;
          if (tokens.includes('close')) close = true;
          break;
        }
        case 'authorization':
          if (authorization !== undefined) return OTHER;
          authorization = value;
          break;
        case 'user-agent':
          userAgent ??= value; // the first, as node:http keeps it
          break;
      }
    }
    i = j + 2;
  }
  // HTTP/1.1 needs exactly one Host (RFC 9112 §3.2): node:http answers 400 otherwise.
  if (length < 0 || length > bodyLimit || hosts !== 1) return OTHER;
  return { route, bodyStart: end + 4, length, authorization, userAgent, close };
}
const POST = Buffer.from('POST ');

export function createHttpServer(opts: HttpOptions): HttpServer {
  const server = createServer(opts.fallback);
  server.keepAliveTimeout = opts.keepAliveTimeout;
  server.headersTimeout = opts.headersTimeout;
  server.requestTimeout = opts.requestTimeout;
  // node:http listens for 'connection' with its own listener; ours goes first and passes on
  // the connections (from a request boundary) that are node:http's to serve.
  const [nodeConnection] = server.listeners('connection') as ((socket: Socket) => void)[];
  if (!nodeConnection || server.listenerCount('connection') !== 1) throw new Error('bug: node:http has no single connection listener');
  server.removeListener('connection', nodeConnection);

  const connections = new Set<Connection>();
  let closing = false;
  server.on('connection', (socket: Socket) => {
    const connection = serve(socket, opts, {
      closing: () => closing,
      handOff(buffered) {
        connections.delete(connection);
        socket.setTimeout(0);
        socket.pause();
        if (buffered.length > 0) socket.unshift(buffered);
        nodeConnection.call(server, socket);
        socket.resume();
      },
      done: () => connections.delete(connection),
    });
    connections.add(connection);
  });

  return {
    server,
    closeIdleConnections() {
      closing = true;
      for (const c of connections) if (c.idle()) c.socket.destroy();
      server.closeIdleConnections();
    },
    closeAllConnections() {
      closing = true;
      for (const c of connections) c.socket.destroy();
      server.closeAllConnections();
    },
  };
}

type Connection = { socket: Socket; idle(): boolean };

function serve(
  socket: Socket,
  opts: HttpOptions,
  server: { closing(): boolean; handOff(buffered: Buffer): void; done(): void },
): Connection {
  let parts: Buffer[] = [];
  let size = 0;
  let head: Head | undefined;
  /** When the first byte of the request now arriving came in. */
  let started = 0;
  let busy = false;
  let ended = false;
  let handedOff = false;

  /** Drops a client that has spent longer than `limit` on the request now arriving. */
  const dropIfOverdue = (limit: number) => {
    if (Date.now() - started > limit) socket.destroy();
  };

  const gather = (): Buffer => {
    if (parts.length !== 1) parts = [Buffer.concat(parts, size)];
    return parts[0] as Buffer;
  };

  const onData = (chunk: Buffer) => {
    const first = size === 0;
    if (first) started = Date.now();
    parts.push(chunk);
    size += chunk.length;
    if (busy) {
      if (size > MAX_AHEAD) socket.pause();
      return;
    }
    // A head can only have ended in a chunk holding its last LF: a client that trickles a head
    // in tiny pieces must not make us join and rescan it on every piece. The first piece is
    // always read, so another method or path goes to node:http at once.
    if (head || first || size > MAX_HEAD || chunk.includes(LF)) next();
    else dropIfOverdue(opts.headersTimeout);
  };
  const onEnd = () => {
    ended = true;
    if (!busy) socket.end();
  };
  const onTimeout = () => {
    if (!busy) socket.destroy();
  };
  const onError = () => socket.destroy();
  const onClose = () => server.done();
  socket.on('data', onData);
  socket.on('end', onEnd);
  socket.on('error', onError);
  socket.on('close', onClose);
  socket.on('timeout', onTimeout);
  socket.setTimeout(opts.keepAliveTimeout);

  function handOff() {
    handedOff = true;
    socket.removeListener('data', onData);
    socket.removeListener('end', onEnd);
    socket.removeListener('error', onError);
    socket.removeListener('close', onClose);
    socket.removeListener('timeout', onTimeout);
    const buffered = size > 0 ? gather() : Buffer.alloc(0);
    parts = [];
    size = 0;
    server.handOff(buffered);
  }

  function next() {
    while (size > 0 && !busy) {
      if (!head) {
        const parsed = parseHead(gather(), opts.routes, opts.bodyLimit);
        if (parsed === OTHER) return handOff();
        if (parsed === INCOMPLETE) return dropIfOverdue(opts.headersTimeout);
        head = parsed;
      }
      const need = head.bodyStart + head.length;
      if (size < need) return dropIfOverdue(opts.requestTimeout);
      const buf = gather();
      const body = buf.toString('utf8', head.bodyStart, need);
      if (size > need) {
        parts = [buf.subarray(need)];
        size -= need;
        started = Date.now();
      } else {
        parts = [];
        size = 0;
      }
      const { route, authorization, userAgent, close } = head;
      head = undefined;
      busy = true;
      route(body, authorization, userAgent).then(
        (reply) => answer(reply, close),
        (err: Error) => answer({ status: 500, type: 'text/plain; charset=UTF-8', body: `internal error: ${err.message}` }, true),
      );
    }
  }

  function answer(reply: Reply, close: boolean) {
    busy = false;
    if (socket.destroyed) return;
    const last = close || server.closing();
    socket.write(encode(reply, last, opts.keepAliveTimeout));
    if (last) return void socket.end();
    if (socket.isPaused()) socket.resume();
    next();
    // The client has sent its last request (half-close): end once all have their answer.
    if (ended && !busy && !handedOff) socket.end();
  }

  return { socket, idle: () => !busy && size === 0 };
}

let dateSecond = -1;
let dateText = '';
/** The Date header's value, built once a second as node:http does. */
function httpDate(): string {
  const now = Date.now();
  const second = Math.floor(now / 1000);
  if (second !== dateSecond) {
    dateSecond = second;
    dateText = new Date(now).toUTCString();
  }
  return dateText;
}

function encode(reply: Reply, close: boolean, keepAliveTimeout: number): string {
  let extra = '';
  if (reply.headers) for (const [name, value] of Object.entries(reply.headers)) extra += `${name}: ${value}\r\n`;
  return (
    `HTTP/1.1 ${reply.status} ${STATUS_CODES[reply.status] ?? ''}\r\n` +
    `Content-Type: ${reply.type}\r\nContent-Length: ${Buffer.byteLength(reply.body)}\r\nDate: ${httpDate()}\r\n` +
    (close ? 'Connection: close\r\n' : `Connection: keep-alive\r\nKeep-Alive: timeout=${Math.floor(keepAliveTimeout / 1000)}\r\n`) +
    `${extra}\r\n${reply.body}`
  );
}
