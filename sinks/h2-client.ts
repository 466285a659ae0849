// One HTTP/2 connection to a push provider (APNs, FCM), shared by every send of a sink: opened
// through sinks/provider-net.ts (HTTPS_PROXY as a CONNECT tunnel, NODE_EXTRA_CA_CERTS), retired
// on GOAWAY or error so that the next request opens a new one, with streams kept within the
// server's SETTINGS_MAX_CONCURRENT_STREAMS (requests beyond it wait for a free stream).
//
// Both providers answer each notification on its own stream, so a stream is the unit of work
// here: at a few thousand pushes a second this is the relay's hottest code after the HTTP
// server, and node:http2 costs ~110 µs of CPU per stream on our machines (bench/README.md,
// "FCM and APNs"). So the common path adds nothing to it that can be shared: no promise before
// the stream opens when a slot is free, no timer per stream (one sweep per connection gives up
// on streams the provider never answers), and a body is kept only when it is not a success.
import { connect as http2Connect, constants as h2, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http2';
import type { Logger } from 'pino';
import type { TLSSocket } from 'node:tls';
import { dialProvider, type DialOptions } from './provider-net.js';

/** The provider's answer: its status, headers and (unless 2xx) body text. */
export type H2Answer = { status: number; headers: IncomingHttpHeaders; body: string };
/** No answer. `refused`: the server never processed the stream (RFC 9113 §8.7), so it was safe to send again, and was, once. */
export type H2Failure = { error: string; refused?: boolean; deadline?: boolean };

export type H2Client = {
  /** Connects now (a sink's start); rejects with the reason when the provider cannot be reached. */
  connect(): Promise<void>;
  /** One request on a free stream; resolves with the answer or why there is none, never rejects. */
  request(headers: OutgoingHttpHeaders, body: string, signal: AbortSignal): Promise<H2Answer | H2Failure>;
  /** Closes the current connection gracefully (APNs' `Shutdown` answer); the next request opens another. */
  retire(): void;
  connected(): boolean;
  /** Why the last connection or request failed; cleared by the next success. */
  lastError(): string | undefined;
  close(): Promise<void>;
};

export type H2ClientOptions = {
  /** The provider's host name, e.g. api.push.apple.com (port 443, SNI and :authority). */
  host: string;
  /** How log lines name the provider: `APNs`, `FCM`. */
  label: string;
  log: Logger;
  /** More TLS options for the connection (a client certificate). */
  tls?: Partial<DialOptions>;
  /** Gives up on a stream the provider has not answered after this long (default 30 s). */
  streamTimeoutMs?: number;
  /** Gives up on a connection whose TLS and HTTP/2 handshake take longer (default 10 s). */
  connectTimeoutMs?: number;
};

/** A stream the provider never answers is given up after this (the relay's deadline has long passed). */
const STREAM_TIMEOUT_MS = 30_000;
/** Providers close idle connections; a PING now and then shows whether ours still lives. */
const PING_INTERVAL_MS = 60_000;
const SWEEP_MS = 5_000;
const CONNECT_TIMEOUT_MS = 10_000;
/** Before the server's SETTINGS arrive, as RFC 9113 §6.5.2 suggests. */
const DEFAULT_STREAM_LIMIT = 100;

/** `streams`: open ones, with when each started and how it ends when the provider never answers. */
type Conn = { session: ClientHttp2Session; active: number; streams: Map<ClientHttp2Stream, { started: number; expire(): void }> };

export function createH2Client({ host, label, log, tls, streamTimeoutMs = STREAM_TIMEOUT_MS, connectTimeoutMs = CONNECT_TIMEOUT_MS }: H2ClientOptions): H2Client {
  const sweepMs = Math.min(SWEEP_MS, Math.max(50, streamTimeoutMs / 4));
  const pingEvery = Math.max(1, Math.round(PING_INTERVAL_MS / sweepMs));
  let conn: Conn | undefined;
  let connecting: Promise<Conn> | undefined;
  /** Requests waiting for a free stream, woken when one frees up or the connection changes. */
  const waiting: Array<() => void> = [];
  let lastError: string | undefined;
  let closed = false;

  const usable = (c: Conn | undefined): c is Conn => !!c && !c.session.closed && !c.session.destroyed;
  const limit = (c: Conn) => c.session.remoteSettings.maxConcurrentStreams ?? DEFAULT_STREAM_LIMIT;
  const wakeAll = () => {
    for (const wake of waiting.splice(0)) wake();
  };

  /** The TLS connection and the HTTP/2 handshake, within connectTimeoutMs (a peer that accepts and then says nothing must not hold every push). */
  function connectOnce(): Promise<Conn> {
    return new Promise<Conn>((resolve, reject) => {
      let settled = false;
      let socket: TLSSocket | undefined;
      let c: Conn | undefined;
      const finish = (err?: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          c?.session.destroy();
          socket?.destroy();
          reject(err);
        } else resolve(c as Conn);
      };
      const timer = setTimeout(() => finish(new Error(`no TLS and HTTP/2 handshake within ${connectTimeoutMs} ms`)), connectTimeoutMs);
      dialProvider({ host, port: 443, servername: host, ALPNProtocols: ['h2'], ...tls }).then(
        (s) => {
          socket = s;
          if (settled) return void s.destroy();
          c = sessionOn(s);
          c.session.once('connect', () => finish());
          c.session.once('error', (err) => finish(err));
        },
        (err: Error) => finish(err),
      );
    });
  }

  /** An HTTP/2 session on `socket`, with what retires it and sweeps its streams. */
  function sessionOn(socket: TLSSocket): Conn {
    const session = http2Connect(`https://${host}`, { createConnection: () => socket, settings: { enablePush: false } });
    const c: Conn = { session, active: 0, streams: new Map() };
    const retire = (why: string) => {
      if (conn === c) conn = undefined;
      if (why) lastError = why;
      wakeAll();
    };
    session.on('goaway', (code) => {
      log.info({ code }, `${label} sent GOAWAY; the next push opens a new connection`);
      retire('');
    });
    session.on('error', (err) => {
      log.warn({ err: err.message }, `${label} connection error; the next push reconnects`);
      retire(err.message);
    });
    session.on('close', () => {
      // Not before: the streams a GOAWAY let finish are still swept until the session ends.
      clearInterval(timers);
      retire('');
    });
    // Apple raises the stream limit once it trusts the connection: let waiters in.
    session.on('remoteSettings', () => {
      while (waiting.length && c.active < limit(c)) waiting.shift()?.();
    });
    let sweeps = 0;
    const timers = setInterval(() => {
      const now = Date.now();
      for (const [stream, s] of c.streams) {
        if (now - s.started <= streamTimeoutMs) continue;
        s.expire();
        stream.close(h2.NGHTTP2_CANCEL);
      }
      if (++sweeps % pingEvery === 0 && usable(c)) session.ping(() => {});
    }, sweepMs).unref();
    return c;
  }

  function open(): Promise<Conn> {
    connecting ??= connectOnce()
      .then(
        (c) => {
          connecting = undefined;
          if (closed) {
            c.session.close();
            throw new Error(`${label} client closed`);
          }
          conn = c;
          lastError = undefined;
          return c;
        },
        (err: Error) => {
          connecting = undefined;
          lastError = `cannot connect to ${host}: ${err.message}`;
          throw new Error(lastError);
        },
      );
    return connecting;
  }

  /** A connection with a free stream, taken; undefined once `signal` aborts first. */
  async function slot(signal: AbortSignal): Promise<Conn | undefined> {
    for (let tries = 0; tries < 1000; tries++) {
      if (signal.aborted || closed) return undefined;
      const c = usable(conn) ? conn : await open();
      if (usable(c) && c.active < limit(c)) {
        c.active++;
        return c;
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          signal.removeEventListener('abort', wake);
          const i = waiting.indexOf(wake);
          if (i >= 0) waiting.splice(i, 1);
          resolve();
        };
        waiting.push(wake);
        signal.addEventListener('abort', wake, { once: true });
      });
    }
    return undefined;
  }

  function release(c: Conn) {
    c.active--;
    if (waiting.length && usable(conn) && conn.active < limit(conn)) waiting.shift()?.();
  }

  function post(c: Conn, headers: OutgoingHttpHeaders, body: string): Promise<H2Answer | H2Failure> {
    return new Promise((resolve) => {
      let settled = false;
      let stream: ClientHttp2Stream;
      const done = (a: H2Answer | H2Failure) => {
        if (settled) return;
        settled = true;
        c.streams.delete(stream);
        release(c);
        resolve(a);
      };
      try {
        stream = c.session.request(headers);
      } catch (err) {
        settled = true;
        release(c);
        return resolve({ error: (err as Error).message });
      }
      c.streams.set(stream, { started: Date.now(), expire: () => done({ error: `no answer within ${streamTimeoutMs} ms` }) });
      let status = 0;
      let answer: IncomingHttpHeaders | undefined;
      let chunks: Buffer[] | undefined;
      stream.on('response', (h: IncomingHttpHeaders) => {
        answer = h;
        status = Number(h[':status']);
        if (status < 200 || status > 299) chunks = [];
      });
      stream.on('data', (chunk: Buffer) => chunks?.push(chunk));
      stream.on('end', () => {
        if (!status) return done({ error: 'stream ended without a response' });
        done({ status, headers: answer as IncomingHttpHeaders, body: chunks ? Buffer.concat(chunks).toString('utf8') : '' });
      });
      stream.on('error', (err) => done({ error: err.message, refused: !status && stream.rstCode === h2.NGHTTP2_REFUSED_STREAM }));
      stream.on('close', () =>
        done(status ? { error: 'stream closed early' } : { error: `stream closed (code ${stream.rstCode})`, refused: stream.rstCode === h2.NGHTTP2_REFUSED_STREAM }),
      );
      stream.end(body);
    });
  }

  function request(headers: OutgoingHttpHeaders, body: string, signal: AbortSignal, again = true): Promise<H2Answer | H2Failure> {
    const c = conn;
    // The common case: a live connection with a free stream, no promise before the stream opens.
    const sent: Promise<H2Answer | H2Failure> =
      usable(c) && c.active < limit(c) && !signal.aborted
        ? (c.active++, post(c, headers, body))
        : slot(signal).then(
            (got) => (got ? post(got, headers, body) : closed ? { error: `${label} client closed` } : { error: `no ${label} stream free before the deadline`, deadline: true }),
            (err: Error) => ({ error: err.message }),
          );
    return sent.then((a) => {
      if (!('error' in a)) {
        lastError = undefined;
        return a;
      }
      // The provider never saw it: straight onto a new connection, once.
      if (a.refused && again && !signal.aborted) return request(headers, body, signal, false);
      if (!a.deadline) lastError = a.error;
      return a;
    });
  }

  return {
    connect: () => open().then(() => undefined),
    request,
    retire() {
      if (usable(conn)) conn.session.close();
    },
    connected: () => usable(conn),
    lastError: () => lastError,
    async close() {
      closed = true;
      wakeAll();
      const c = conn;
      conn = undefined;
      if (!c || c.session.destroyed) return;
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          c.session.destroy();
          resolve();
        }, 2000);
        c.session.close(() => {
          clearTimeout(t);
          resolve();
        });
      });
    },
  };
}
