// The HTTP face: Mattermost's two calls plus the operator's endpoints, behind one parser.
//
// Mattermost posts JSON with no Content-Type (§1.1), never retries (§0.5) and only reads a
// 200 reply whose values are all strings (§3.1): every path below ends in such a reply,
// including bad input and bugs, so the server's log always says what went wrong.
//
// Every byte on the port is read by node:http (llhttp, the parser every Node server and its
// security fixes share). The two API calls have two entrances that build the same request
// value and go through the same guards into the same handler (`serveApi`):
// - `listener`, the node:http listener: a POST to an API path is served straight from the
//   IncomingMessage, without Hono's WHATWG Request, body stream and AbortSignal per call
//   (on our 2-core machines those cost more than the rest of a notification, bench/README.md);
//   everything else goes to Hono;
// - Hono's routes for the same paths, which is what `app.request()` reaches in tests.
// test/http.test.ts holds the two to the same bytes for the same requests.
import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { getRequestListener } from '@hono/node-server';
import { Hono, type Context } from 'hono';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { fastNotification, parseBody, PushAckSchema, PushNotificationSchema, shortToken, type PushNotification, type PushResponse } from './contract.js';
import { replyFor, type Dispatcher } from './dispatch.js';
import { adminGuard, clientResolver, createGuards, payloadProblem, type ApiAnswer, type ApiRequest, type Caller, type Endpoint, type Guard, type Refusals } from './guards.js';
import type { Metrics } from './metrics.js';
import type { ReloadResult } from './reload.js';
import type { Router } from './route.js';
import { createSignatureCheck } from './signatures.js';
import { VERSION } from './version.js';
import type { Sink } from '../sinks/types.js';

export type AppDeps = {
  config: Config;
  sinks: readonly Sink[];
  router: Router;
  dispatcher: Dispatcher;
  metrics: Metrics;
  logger: Logger;
  /** The pairing page and its API (src/pairing.ts), mounted at `/`. */
  pairing?: Hono<any>; // eslint-disable-line @typescript-eslint/no-explicit-any -- its own Bindings
  /** Counts and logs refused requests; shared by every app a reload builds. */
  refusals: Refusals;
  /** Reads the config again and reloads it (POST /admin/reload); absent: the endpoint says there is nothing to reload from. */
  reload?: () => Promise<ReloadResult>;
};

export type { ApiAnswer, ApiRequest, Endpoint, Guard } from './guards.js';

export type App = Hono & {
  inFlight(): number;
  /** The node:http listener: the API calls directly, everything else through Hono. */
  listener: RequestListener;
  /** Routes and delivers one notification as a send_push would (the pairing page's test push). */
  push(n: PushNotification): Promise<PushResponse>;
};

export function createApp({ config, sinks, router, dispatcher, metrics, logger, refusals, pairing, reload }: AppDeps): App {
  const base = config.server.basePath;
  const limit = config.server.bodyLimit;
  const paths = new Map<string, Endpoint>([
    [`${base}/api/v1/send_push`, 'send_push'],
    [`${base}/api/v1/ack`, 'ack'],
  ]);
  const clientOf = clientResolver(config.server.trustProxy);
  const guards: Guard[] = createGuards(config.server, { refusals, clientOf });
  const admin = config.admin.token ? adminGuard(config.admin.token, { refusals, clientOf }) : undefined;
  const ackSinks = sinks.filter((s) => s.ack);
  const checkSignature = createSignatureCheck(config.signatures, metrics.registry);
  let inFlight = 0;
  let seq = 0;

  const pid = process.pid.toString(36);

  /** A valid notification: its signature (when signatures.publicKey is set), then routes and sinks. */
  function deliver(n: PushNotification, req: () => string, ua?: string): Promise<PushResponse> {
    metrics.received(n.type);
    let child: Logger | undefined;
    const log = () =>
      (child ??= logger.child({ req: req(), ack_id: n.ack_id, platform: n.platform, type: n.type, device: shortToken(n.device_id) }));
    if (!checkSignature) return dispatch(n, log);
    // signatures.publicKey: a push that does not verify is answered FAIL and reaches no sink.
    return checkSignature(n).then((refused) => {
      if (refused === undefined) return dispatch(n, log);
      metrics.reply('FAIL');
      log().warn({ error: refused, ua }, 'refused a push: signature check failed');
      return { status: 'FAIL', error: refused };
    });
  }

  function dispatch(n: PushNotification, log: () => Logger): Promise<PushResponse> {
    return dispatcher.deliver(n, router(n), log).then((deliveries) => {
      const answer = replyFor(deliveries);
      metrics.reply(answer.status);
      if (answer.status !== 'OK') log().warn({ status: answer.status, error: answer.error }, 'answered Mattermost with a failure');
      else if (logger.isLevelEnabled('debug')) log().debug({ sinks: deliveries.map((d) => `${d.sink.name}:${d.result.kind}`) }, 'notification handled');
      return answer;
    });
  }

  /** Parses, routes and delivers. */
  function sendPush(text: string, ua: string | undefined): PushResponse | Promise<PushResponse> {
    const id = ++seq;
    const req = () => `${pid}-${id.toString(36)}`;
    const refuse = (error: string, msg: string): PushResponse => {
      metrics.invalid('send_push', 'invalid_payload');
      metrics.reply('FAIL');
      logger.warn({ req: req(), error, ua }, msg);
      return { status: 'FAIL', error };
    };
    const parsed = parseBody(PushNotificationSchema, text, fastNotification);
    if (!parsed.ok) return refuse(parsed.error, 'rejected an invalid send_push payload');
    // Decided before any sink (or the outbox) sees the push: see MAX_DEPTH in guards.ts.
    const problem = payloadProblem(parsed.value, text);
    if (problem) return refuse(problem, 'rejected a send_push payload over a limit');
    return deliver(parsed.value, req, ua);
  }

  function ack(text: string): PushResponse {
    const parsed = parseBody(PushAckSchema, text);
    if (!parsed.ok) {
      metrics.invalid('ack', 'invalid_payload');
      logger.warn({ error: parsed.error }, 'rejected an invalid ack payload');
      return { status: 'FAIL', error: parsed.error };
    }
    metrics.ack();
    logger.debug({ ack_id: parsed.value.id, type: parsed.value.type, platform: parsed.value.platform }, 'ack');
    // Sinks that want acks (an upstream proxy counts them) get them in the background: the
    // reply never waits for them, and each is bounded by the delivery deadline.
    for (const s of ackSinks) {
      void s.ack!(text, AbortSignal.timeout(config.sinks[s.name]?.deadline ?? config.delivery.deadline)).catch((err: unknown) =>
        logger.warn({ sink: s.name, err: (err as Error).message }, 'ack forwarding failed'),
      );
    }
    return { status: 'OK' };
  }

  const tooLarge = (endpoint: Endpoint): ApiAnswer => {
    metrics.invalid(endpoint, 'too_large');
    logger.warn({ endpoint, limit }, `rejected a body over server.bodyLimit (${limit} bytes)`);
    return { status: 413, body: { status: 'FAIL', error: `request body larger than ${limit} bytes` } };
  };
  const internalError = (err: unknown, endpoint: Endpoint): ApiAnswer => {
    logger.error({ err, endpoint }, 'bug: request handler failed');
    // Still a contract reply: Mattermost logs the text, and we keep serving.
    return { status: 200, body: { status: 'FAIL', error: `internal error: ${(err as Error).message}` } };
  };
  const ok200 = (body: PushResponse): ApiAnswer => ({ status: 200, body });

  /**
   * The one way into the API, in two steps that both entrances take: `admit` runs the guards
   * before the body is read (a refused client's body is never looked at), `handle` answers once
   * it is in (undefined: over the limit). Plain values where nothing waits, so that the direct
   * listener's common case costs one promise hop (see dispatch.ts).
   */
  function admit(req: ApiRequest): ApiAnswer | undefined {
    for (let i = 0; i < guards.length; i++) {
      const refused = (guards[i] as Guard)(req);
      if (refused) return refused;
    }
    return undefined;
  }

  function handle(req: ApiRequest, text: string | undefined): ApiAnswer | Promise<ApiAnswer> {
    try {
      if (text === undefined) return tooLarge(req.endpoint);
      if (req.endpoint === 'ack') return ok200(ack(text));
      const reply = sendPush(text, req.userAgent);
      return reply instanceof Promise ? reply.then(ok200, (err: unknown) => internalError(err, req.endpoint)) : ok200(reply);
    } catch (err) {
      return internalError(err, req.endpoint);
    }
  }

  /** The client abandoned its request (reset, or a chunked body never finished): no one to answer, nothing delivered. Not a bug. */
  const abandoned = (endpoint: Endpoint, err: Error) => logger.debug({ endpoint, err: err.message }, 'client went away before its request was complete');

  // ---- Hono: operator endpoints, and the API for app.request ----

  const app = new Hono<{ Bindings: { incoming?: IncomingMessage } }>();
  for (const [path, endpoint] of paths) {
    app.post(path, async (c) => {
      const req = honoRequest(c, endpoint);
      let answer = admit(req);
      if (!answer) {
        inFlight++;
        try {
          let text: string | undefined;
          if (!(Number(c.req.header('content-length') ?? NaN) > limit)) {
            const buf = await c.req.arrayBuffer();
            text = buf.byteLength > limit ? undefined : new TextDecoder().decode(buf);
          }
          answer = await handle(req, text);
        } catch (err) {
          abandoned(endpoint, err as Error);
          return c.body(null, 400);
        } finally {
          inFlight--;
        }
      }
      const reply = toReply(answer);
      return c.body(reply.body, reply.status as 200, { 'Content-Type': reply.type, ...reply.headers });
    });
    app.all(path, (c) => c.text('method not allowed: use POST', 405, { Allow: 'POST' }));
  }
  if (pairing) app.route('/', pairing); else app.get('/', (c) => c.html('<html><body>push-relay: a Mattermost push notification relay</body></html>'));
  app.get('/version', (c) => c.json(VERSION));
  app.get('/healthz', (c) => c.json({ status: 'ok' }));
  app.get('/readyz', (c) => {
    const states = Object.fromEntries(sinks.map((s) => [s.name, s.state()]));
    const ready = Object.values(states).every((s) => s.ready);
    return c.json({ status: ready ? 'ready' : 'not ready', sinks: states }, ready ? 200 : 503);
  });
  // What Mattermost never calls sits behind admin.token: /admin/... always (absent without a
  // token), /metrics when admin.metricsAuth.
  const adminOnly = async (c: Context<{ Bindings: { incoming?: IncomingMessage } }>, next: () => Promise<void>) => {
    const refused = admin?.(honoCaller(c));
    if (!admin) return c.text(`not found: ${c.req.method} ${c.req.path}`, 404);
    if (refused) return c.body(refused.body as string, refused.status as 401, { ...refused.headers });
    await next();
  };
  app.use('/admin/*', adminOnly);
  if (config.admin.metricsAuth) app.use('/metrics', adminOnly);
  app.get('/admin/status', (c) =>
    c.json({
      version: VERSION,
      sinks: Object.fromEntries(sinks.map((s) => [s.name, { type: s.type, ...s.state() }])),
      routes: config.routes?.length ?? 0,
      inFlight,
      guards: {
        allow: config.server.allow?.length ?? 0,
        trustProxy: config.server.trustProxy?.length ?? 0,
        rateLimit: config.server.rateLimit ?? null,
        auth: config.server.auth !== undefined,
        tls: config.server.tls !== undefined,
      },
    }),
  );
  // As SIGHUP does, for an operator or a deploy tool that reaches the relay over HTTP only:
  // 200 with what changed, or 422 with why the running config stays.
  app.post('/admin/reload', async (c) => {
    if (!reload) return c.json({ ok: false, problems: ['this relay was started without a config source to read again'] }, 409);
    const result = await reload();
    return c.json(result, result.ok ? 200 : 422);
  });
  app.get('/metrics', async (c) => c.body(await metrics.registry.metrics(), 200, { 'Content-Type': metrics.registry.contentType }));
  app.notFound((c) => c.text(`not found: ${c.req.method} ${c.req.path}`, 404));
  app.onError((err, c) => {
    logger.error({ err, path: c.req.path }, 'bug: request handler failed');
    return c.json({ status: 'FAIL', error: `internal error: ${err.message}` }, 500);
  });

  // ---- node:http: the API calls straight from the IncomingMessage ----

  const hono = getRequestListener(app.fetch);
  const maxHeaderLines = 2 * config.server.maxHeaders;
  const listener: RequestListener = (req, res) => {
    if (req.rawHeaders.length > maxHeaderLines) {
      // node:http stops collecting past server.maxHeadersCount (set one above ours) without
      // refusing: we refuse, RFC 6585 §5.
      res.writeHead(431, { 'Content-Type': 'text/plain; charset=UTF-8', Connection: 'close' });
      return void res.end(`request header fields too large: more than ${config.server.maxHeaders} header lines`);
    }
    if (hostCount(req.rawHeaders) > 1) {
      // RFC 9112 §3.2: a request with more than one Host is answered 400. node:http keeps the first.
      res.writeHead(400, { 'Content-Type': 'text/plain; charset=UTF-8', Connection: 'close' });
      return void res.end('bad request: more than one Host header');
    }
    const url = req.url ?? '';
    const q = url.indexOf('?');
    const endpoint = req.method === 'POST' ? paths.get(q < 0 ? url : url.slice(0, q)) : undefined;
    if (!endpoint) return void hono(req, res);
    const value: ApiRequest = {
      endpoint,
      authorization: req.headers.authorization,
      userAgent: req.headers['user-agent'],
      remoteAddress: req.socket.remoteAddress ?? '',
      forwardedFor: req.headers['x-forwarded-for'] as string | undefined,
    };
    const refused = admit(value);
    if (refused) return send(res, refused);
    inFlight++;
    const finish = (answer: ApiAnswer) => {
      inFlight--;
      send(res, answer);
    };
    readLimited(req, limit, (text) => {
      const answer = handle(value, text);
      if (answer instanceof Promise) void answer.then(finish);
      else finish(answer);
    }, (err) => {
      inFlight--;
      abandoned(endpoint, err);
      if (!res.headersSent) res.destroy();
    });
  };

  return Object.assign(app as unknown as Hono, {
    inFlight: () => inFlight,
    listener,
    push: (n: PushNotification) => deliver(n, () => `${pid}-${(++seq).toString(36)}`),
  });
}

function hostCount(raw: string[]): number {
  let n = 0;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string;
    if (name.length === 4 && name.toLowerCase() === 'host') n++;
  }
  return n;
}

function honoCaller(c: Context<{ Bindings: { incoming?: IncomingMessage } }>): Caller {
  return {
    authorization: c.req.header('authorization'),
    remoteAddress: c.env?.incoming?.socket.remoteAddress ?? '',
    forwardedFor: c.req.header('x-forwarded-for'),
  };
}

function honoRequest(c: Context<{ Bindings: { incoming?: IncomingMessage } }>, endpoint: Endpoint): ApiRequest {
  return { ...honoCaller(c), endpoint, userAgent: c.req.header('user-agent') };
}

/**
 * Calls `done` with the body as UTF-8 text, or undefined once it passes `limit` bytes (declared
 * or sent); `gone` when the client goes away first. Callbacks, not a promise: this is every
 * notification's first step.
 */
function readLimited(req: IncomingMessage, limit: number, done: (text: string | undefined) => void, gone: (err: Error) => void): void {
  const declared = Number(req.headers['content-length'] ?? NaN);
  if (declared > limit) {
    // Answer now; drain what the client still sends so it reads our 413 rather than a reset.
    req.resume();
    return done(undefined);
  }
  let first: Buffer | undefined;
  let chunks: Buffer[] | undefined;
  let size = 0;
  let settled = false;
  req.on('data', (chunk: Buffer) => {
    if (settled) return;
    size += chunk.length;
    if (size > limit) {
      settled = true;
      first = undefined;
      chunks = undefined;
      return done(undefined);
    }
    if (!first) first = chunk;
    else (chunks ??= [first]).push(chunk);
  });
  req.on('end', () => {
    if (settled) return;
    settled = true;
    done((chunks ? Buffer.concat(chunks, size) : (first ?? EMPTY)).toString('utf8'));
  });
  const abort = (err?: Error) => {
    if (settled) return;
    settled = true;
    gone(err ?? new Error('request aborted'));
  };
  req.on('error', abort);
  req.on('close', () => {
    if (!req.complete) abort();
  });
}

const EMPTY = Buffer.alloc(0);

type Reply = { status: number; type: string; body: string; headers?: Readonly<Record<string, string>> };

const JSON_TYPE = 'application/json';
const OK_REPLY: Reply = { status: 200, type: JSON_TYPE, body: JSON.stringify({ status: 'OK' } satisfies PushResponse) };

function toReply(answer: ApiAnswer): Reply {
  const body = answer.body;
  if (typeof body === 'string') return { status: answer.status, type: 'text/plain; charset=UTF-8', body, headers: answer.headers };
  if (answer.status === 200 && body.status === 'OK' && body.error === undefined) return OK_REPLY;
  return { status: answer.status, type: JSON_TYPE, body: JSON.stringify(body), headers: answer.headers };
}

/** The headers of nearly every answer, built once (node:http reads them, never keeps or changes them). */
const OK_HEADERS = { 'Content-Type': OK_REPLY.type, 'Content-Length': Buffer.byteLength(OK_REPLY.body) };

function send(res: ServerResponse, answer: ApiAnswer) {
  const reply = toReply(answer);
  if (reply === OK_REPLY) res.writeHead(200, OK_HEADERS);
  else res.writeHead(reply.status, { 'Content-Type': reply.type, 'Content-Length': Buffer.byteLength(reply.body), ...reply.headers });
  res.end(reply.body);
}
