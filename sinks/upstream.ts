// Upstream sink: forwards each push to another push proxy (Mattermost's mattermost-push-proxy,
// its hosted HPNS, another push-relay) and reports that proxy's answer as its own outcome. This
// is what makes "the official apps keep working, and a copy goes to MQTT" one config.
//
// The body goes as Mattermost posted it, byte for byte (`rawBody` from src/contract.ts), so the
// upstream sees exactly what it would have seen without us; a notification replayed from the
// outbox has lost those bytes and goes as the relay's JSON of it (same fields, defaults filled).
// The request is shaped like Mattermost's own (contract §1.1): POST, no Content-Type,
// User-Agent Mattermost-Bot/1.1, Basic auth from the URL's userinfo, HTTP/1.1 keep-alive.
import { retryAfter } from './retry-after.js';
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { z } from 'zod';
import { rawBody, shortToken, type PushNotification } from '../src/contract.js';
import { duration, flag, int, sinkSchema, url } from '../src/schema.js';
import { defineSink, type Outcome, type SinkFactory, type SinkState } from './types.js';

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

const schema = sinkSchema('upstream', {
  /** The other proxy's base URL, as Mattermost's "Push Notification Server" would hold it. */
  url: url(['http', 'https']),
  /** Longest wait for one answer; the delivery deadline (5 s unless `deadline` says otherwise) cuts it shorter. */
  timeout: duration.default(10_000),
  /** Connections kept to the upstream at most (pooled, keep-alive). */
  connections: int(1, 10_000).default(64),
  /** Forward Mattermost's acks (POST /api/v1/ack) for the pushes this sink delivered. */
  acks: flag.default(true),
  /** Extra request headers, e.g. an Authorization the upstream wants. */
  headers: z
    .record(z.string().regex(HEADER_NAME, { message: 'not a valid HTTP header name' }), z.string().regex(/^[^\r\n\0]*$/, { message: 'no line breaks' }))
    .optional(),
});
export type UpstreamSinkConfig = z.output<typeof schema>;

/**
 * The upstream's answer -> this sink's outcome (issue 8; the reply contract is §3.1, what the
 * server makes of each answer §3.2). One test per row in test/upstream.test.ts.
 *
 * | upstream answers                            | outcome                                       |
 * | ------------------------------------------- | --------------------------------------------- |
 * | 200 {"status":"OK"}                         | delivered                                     |
 * | 200 {"status":"REMOVE"}                     | dead-token `upstream_remove` -> REMOVE        |
 * | 200 {"status":"FAIL","error":"…"}           | permanent `upstream_fail`, the upstream's text|
 * | 200 null, no status or another status       | delivered: Mattermost counts these a success (§3.2 step 6) |
 * | 200, not a JSON map of strings              | permanent `invalid_reply` (Mattermost: "failed to decode"; retrying might deliver twice) |
 * | 429                                         | retryable `rate_limited`, Retry-After honoured |
 * | 5xx                                         | retryable `server_error`, Retry-After honoured |
 * | any other status                            | retryable `http_status`, Retry-After honoured  |
 * | no answer within timeout / deadline         | retryable `timeout`                            |
 * | connection refused, reset, TLS error …      | retryable `connection_failed`                  |
 *
 * REMOVE comes only from the upstream's own REMOVE: never from a transport error (STYLE.md §3).
 */
const REASONS = [
  ['delivered', ''],
  ['dead-token', 'upstream_remove'],
  ['permanent', 'upstream_fail'],
  ['permanent', 'invalid_reply'],
  ['retryable', 'rate_limited'],
  ['retryable', 'server_error'],
  ['retryable', 'http_status'],
  ['retryable', 'timeout'],
  ['retryable', 'connection_failed'],
] as const;

const DELIVERED: Outcome = { kind: 'delivered' };
const READY: SinkState = { ready: true, state: 'ready' };
/** A reply larger than this is not a push proxy's answer (theirs are ~20 bytes). */
const MAX_REPLY_BYTES = 64 * 1024;
/**
 * Idle pooled connections are closed after this. Shorter than Node's http.Server default
 * keep-alive (5 s) and Go's (the official proxy: its 60 s ReadTimeout), so we close an idle
 * connection before the server does and rarely write into one it is closing.
 */
const IDLE_MS = 4_000;
/** Acks in flight at most per sink; beyond it an ack is dropped (counted): acks only feed the upstream's metrics (§3.3). */
const MAX_ACKS_IN_FLIGHT = 256;
/** How many delivered ack ids the sink remembers so that it forwards only acks for its own pushes. */
const REMEMBERED_ACK_IDS = 100_000;
const ACK_MEMORY_MS = 3_600_000;

type Answer = { status: number; headers: IncomingMessage['headers']; body: string };
type Failure = { failed: 'timeout' | 'connection_failed'; detail: string };

const createUpstreamSink: SinkFactory<UpstreamSinkConfig> = (name, config, { logger: log, metrics }) => {
  const base = new URL(config.url);
  const secure = base.protocol === 'https:';
  const prefix = base.pathname.replace(/\/+$/, '');
  // Go turns the URL's userinfo into Basic auth (contract §1.1); so do we, and keep it out of logs.
  const auth = base.username
    ? `Basic ${Buffer.from(`${decodeURIComponent(base.username)}:${decodeURIComponent(base.password)}`).toString('base64')}`
    : undefined;
  const where = `${base.protocol}//${base.host}${prefix}`;
  const headers: Record<string, string> = {
    'User-Agent': 'Mattermost-Bot/1.1',
    ...(auth ? { Authorization: auth } : {}),
    ...config.headers,
  };
  const proxy = secure ? proxyFor(base) : undefined;
  const agentOptions = { keepAlive: true, maxSockets: config.connections, maxFreeSockets: config.connections, scheduling: 'lifo', timeout: IDLE_MS } as const;
  const agent = secure ? new HttpsAgent(agentOptions) : new HttpAgent(agentOptions);
  if (proxy) tunnelThrough(agent as HttpsAgent, proxy);
  const request = secure ? httpsRequest : httpRequest;

  const acks = metrics.counter({
    name: 'push_relay_upstream_acks_total',
    help: 'Acks forwarded to an upstream push proxy, by sink and result (forwarded, failed, not_ours, dropped).',
    labelNames: ['sink', 'result'],
  });
  for (const r of ['forwarded', 'failed', 'not_ours', 'dropped']) acks.labels(name, r).inc(0);

  // ack_id -> when it was delivered. Insertion order is delivery order, so the oldest is first.
  const delivered = new Map<string, number>();
  const remember = (ackId: string) => {
    if (!ackId) return;
    const now = Date.now();
    delivered.delete(ackId);
    delivered.set(ackId, now);
    for (const [id, at] of delivered) {
      if (delivered.size <= REMEMBERED_ACK_IDS && now - at < ACK_MEMORY_MS) break;
      delivered.delete(id);
    }
  };
  let acksInFlight = 0;
  let lastProblem: string | undefined;

  /** One POST; resolves with the answer or why there is none. Never rejects. */
  function post(path: string, body: Buffer, signal: AbortSignal, retryStale = true): Promise<Answer | Failure> {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve({ failed: 'timeout', detail: `no time left to reach ${where}` });
      let done = false;
      const finish = (r: Answer | Failure) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        resolve(r);
      };
      const req = request(
        `${base.origin}${prefix}${path}`,
        { method: 'POST', agent, headers: { ...headers, 'Content-Length': String(body.length) } },
        (res) => {
          const chunks: Buffer[] = [];
          let size = 0;
          res.on('data', (c: Buffer) => {
            size += c.length;
            if (size <= MAX_REPLY_BYTES) chunks.push(c);
          });
          res.on('end', () =>
            finish({ status: res.statusCode ?? 0, headers: res.headers, body: size > MAX_REPLY_BYTES ? '' : Buffer.concat(chunks).toString('utf8') }),
          );
          res.on('error', (err) => finish({ failed: 'connection_failed', detail: `${where}: reply cut off: ${err.message}` }));
        },
      );
      const timeoutMs = config.timeout;
      const timer = setTimeout(() => {
        finish({ failed: 'timeout', detail: `${where}: no answer within ${timeoutMs} ms` });
        req.destroy();
      }, timeoutMs);
      const onAbort = () => {
        finish({ failed: 'timeout', detail: `${where}: no answer within the delivery deadline` });
        req.destroy();
      };
      signal.addEventListener('abort', onAbort, { once: true });
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (done) return;
        // A pooled connection the server closed while idle fails at once with a reset and no
        // reply: the request never reached it, so one retry on a fresh connection is safe
        // (Node's documented pattern for keep-alive agents, `request.reusedSocket`).
        if (retryStale && req.reusedSocket && (err.code === 'ECONNRESET' || err.code === 'EPIPE')) {
          done = true;
          clearTimeout(timer);
          signal.removeEventListener('abort', onAbort);
          return void post(path, body, signal, false).then(resolve);
        }
        finish({ failed: 'connection_failed', detail: `${where}: ${err.code ? `${err.code} ` : ''}${err.message}` });
      });
      req.end(body);
    });
  }

  function outcomeOf(r: Answer | Failure): Outcome {
    if ('failed' in r) return { kind: 'retryable', reason: r.failed, detail: r.detail };
    if (r.status !== 200) {
      const reason = r.status === 429 ? 'rate_limited' : r.status >= 500 ? 'server_error' : 'http_status';
      const retryAfterMs = retryAfter(r.headers['retry-after']);
      const text = r.body.trim().slice(0, 200);
      return {
        kind: 'retryable',
        reason,
        detail: `${where} answered HTTP ${r.status}${text ? `: ${text}` : ''}`,
        ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
      };
    }
    const reply = pushResponse(r.body);
    if (reply === undefined) {
      return { kind: 'permanent', reason: 'invalid_reply', detail: `${where} answered 200 with a body that is not a push proxy reply: ${r.body.slice(0, 100)}` };
    }
    if (reply.status === 'REMOVE') return { kind: 'dead-token', reason: 'upstream_remove', detail: `${where} answered REMOVE` };
    if (reply.status === 'FAIL') return { kind: 'permanent', reason: 'upstream_fail', detail: reply.error || `${where} answered FAIL` };
    return DELIVERED;
  }

  return {
    name,
    type: 'upstream',
    perDevice: true,
    reasons: REASONS,

    async start() {
      // Say once at start whether the upstream answers, without holding start-up for long.
      const probe = new AbortController();
      const t = setTimeout(() => probe.abort(), 2000);
      try {
        const res = await fetchVersion(probe.signal);
        if (res) log.info({ upstream: where, ...res }, 'upstream push proxy answers');
      } catch (err) {
        log.warn({ upstream: where, err: (err as Error).message }, 'upstream push proxy not reachable yet; pushes to it are retried');
      } finally {
        clearTimeout(t);
      }
    },

    state: () => (lastProblem ? { ...READY, detail: `last failure: ${lastProblem}` } : READY),

    send(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
      const body = Buffer.from(rawBody(n) ?? JSON.stringify(n), 'utf8');
      return post('/api/v1/send_push', body, signal).then((r) => {
        const outcome = outcomeOf(r);
        if (outcome.kind === 'delivered') {
          lastProblem = undefined;
          if (config.acks) remember(n.ack_id);
        } else {
          lastProblem = ('detail' in outcome && outcome.detail) || outcome.reason;
          if (outcome.kind === 'dead-token') log.info({ device: shortToken(n.device_id), ack_id: n.ack_id }, 'upstream reported the device token dead');
        }
        return outcome;
      });
    },

    async ack(body: string, signal: AbortSignal): Promise<void> {
      if (!config.acks) return;
      let id: unknown;
      try {
        id = (JSON.parse(body) as { id?: unknown }).id;
      } catch {
        return; // the server validated it already; nothing to forward
      }
      // Only the acks for pushes this sink delivered: the others belong to pushes the upstream
      // never saw (a copy that went only to MQTT, say), and their ids are not its business.
      if (typeof id !== 'string' || !delivered.has(id)) return void acks.labels(name, 'not_ours').inc();
      if (acksInFlight >= MAX_ACKS_IN_FLIGHT) return void acks.labels(name, 'dropped').inc();
      acksInFlight++;
      try {
        const r = await post('/api/v1/ack', Buffer.from(body, 'utf8'), signal);
        // The server reads only the status of an ack's answer (§3.3).
        if ('failed' in r || r.status !== 200) {
          acks.labels(name, 'failed').inc();
          log.debug({ upstream: where, error: 'failed' in r ? r.detail : `HTTP ${r.status}` }, 'ack not forwarded');
        } else {
          delivered.delete(id);
          acks.labels(name, 'forwarded').inc();
        }
      } finally {
        acksInFlight--;
      }
    },

    async close() {
      agent.destroy();
    },
  };

  /** GET <url>/version (the official proxy's and ours, §1.2): its JSON, or undefined for anything else. */
  function fetchVersion(signal: AbortSignal): Promise<Record<string, string> | undefined> {
    return new Promise((resolve, reject) => {
      const req = request(`${base.origin}${prefix}/version`, { method: 'GET', agent, headers, signal }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text = (text + c).slice(0, 1000)));
        res.on('end', () => {
          try {
            const v = JSON.parse(text) as { version?: unknown; hash?: unknown };
            resolve(typeof v.version === 'string' ? { version: v.version, hash: String(v.hash ?? '') } : undefined);
          } catch {
            resolve(undefined);
          }
        });
      });
      req.on('error', reject);
      req.end();
    });
  }
};

/** The body as Mattermost decodes it, `map[string]string` (§3.1); undefined if it is not one. */
function pushResponse(text: string): { status?: string; error?: string } | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (v === null) return {}; // Go decodes null into an empty map: a success (§3.2 step 3)
  if (typeof v !== 'object' || Array.isArray(v)) return undefined;
  for (const value of Object.values(v)) if (typeof value !== 'string') return undefined;
  return v as { status?: string; error?: string };
}


/**
 * HTTPS_PROXY (or https_proxy) unless NO_PROXY covers the host, as Go's ProxyFromEnvironment
 * reads them (the official proxy does the same, contract §5.1). Only http:// proxies.
 */
function proxyFor(target: URL, env: Record<string, string | undefined> = process.env): URL | undefined {
  const value = env.HTTPS_PROXY || env.https_proxy;
  if (!value) return undefined;
  const noProxy = (env.NO_PROXY || env.no_proxy || '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);
  const host = target.hostname.toLowerCase();
  if (noProxy.some((p) => p === '*' || host === p.replace(/^\./, '') || host.endsWith(p.startsWith('.') ? p : `.${p}`))) return undefined;
  try {
    const proxy = new URL(/^[a-z]+:\/\//i.test(value) ? value : `http://${value}`);
    return proxy.protocol === 'http:' ? proxy : undefined;
  } catch {
    return undefined;
  }
}

/** Opens each of the agent's TLS connections through an HTTP CONNECT tunnel (RFC 9110 §9.3.6). */
function tunnelThrough(agent: HttpsAgent, proxy: URL): void {
  const proxyAuth = proxy.username
    ? { 'Proxy-Authorization': `Basic ${Buffer.from(`${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`).toString('base64')}` }
    : {};
  type Options = { host?: string; port?: number | string; servername?: string } & Record<string, unknown>;
  (agent as unknown as { createConnection: (o: Options, cb: (err: Error | null, s?: Socket) => void) => undefined }).createConnection = (
    options,
    callback,
  ) => {
    const host = String(options.host);
    const port = Number(options.port ?? 443);
    const req = httpRequest({
      host: proxy.hostname,
      port: Number(proxy.port || 80),
      method: 'CONNECT',
      path: `${host}:${port}`,
      headers: { Host: `${host}:${port}`, ...proxyAuth },
      agent: false,
      createConnection: () => netConnect(Number(proxy.port || 80), proxy.hostname),
    });
    req.once('connect', (res, socket) => {
      if (res.statusCode !== 200) {
        socket.destroy();
        return callback(new Error(`HTTPS_PROXY ${proxy.host} refused CONNECT ${host}:${port}: HTTP ${res.statusCode}`));
      }
      callback(null, tlsConnect({ ...options, port, socket, servername: options.servername ?? host }));
    });
    req.once('error', (err) => callback(new Error(`HTTPS_PROXY ${proxy.host}: ${err.message}`)));
    req.end();
    return undefined;
  };
}

export default defineSink({ type: 'upstream', schema, create: createUpstreamSink });
