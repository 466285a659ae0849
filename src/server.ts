// The HTTP face: Mattermost's two calls plus the operator's endpoints.
//
// Mattermost posts JSON with no Content-Type (§1.1), never retries (§0.5) and only reads a
// 200 reply whose values are all strings (§3.1): every path below ends in such a reply,
// including bad input and bugs, so the server's log always says what went wrong.
import { timingSafeEqual } from 'node:crypto';
import { Hono, type Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { parseBody, PushAckSchema, PushNotificationSchema, shortToken, type PushResponse } from './contract.js';
import { replyFor, type Dispatcher } from './dispatch.js';
import type { Metrics } from './metrics.js';
import type { Router } from './route.js';
import { VERSION } from './version.js';
import type { Sink } from '../sinks/types.js';

export type AppDeps = {
  config: Config;
  sinks: readonly Sink[];
  router: Router;
  dispatcher: Dispatcher;
  metrics: Metrics;
  logger: Logger;
};

export type App = Hono & { inFlight(): number };

export function createApp({ config, sinks, router, dispatcher, metrics, logger }: AppDeps): App {
  const app = new Hono();
  const base = config.server.basePath;
  const limit = config.server.bodyLimit;
  let inFlight = 0;
  let seq = 0;

  const api = new Hono();
  api.use('*', async (c, next) => {
    inFlight++;
    try {
      await next();
    } finally {
      inFlight--;
    }
  });
  if (config.server.auth) api.use('*', basicAuth(config.server.auth, logger));
  api.use(
    '*',
    bodyLimit({
      maxSize: limit,
      onError: (c) => {
        const endpoint = c.req.path.endsWith('/ack') ? 'ack' : 'send_push';
        metrics.invalid(endpoint, 'too_large');
        logger.warn({ endpoint, limit }, `rejected a body over server.bodyLimit (${limit} bytes)`);
        return c.json({ status: 'FAIL', error: `request body larger than ${limit} bytes` }, 413);
      },
    }),
  );

  api.post('/send_push', async (c) => {
    const req = `${process.pid.toString(36)}-${(++seq).toString(36)}`;
    const parsed = parseBody(PushNotificationSchema, await c.req.text());
    if (!parsed.ok) {
      metrics.invalid('send_push', 'invalid_payload');
      metrics.reply('FAIL');
      logger.warn({ req, error: parsed.error, ua: c.req.header('user-agent') }, 'rejected an invalid send_push payload');
      return reply(c, { status: 'FAIL', error: parsed.error });
    }
    const n = parsed.value;
    metrics.received(n.type);
    let child: Logger | undefined;
    const log = () =>
      (child ??= logger.child({ req, ack_id: n.ack_id, platform: n.platform, type: n.type, device: shortToken(n.device_id) }));
    const deliveries = await dispatcher.deliver(n, router(n), log);
    const answer = replyFor(deliveries);
    metrics.reply(answer.status);
    if (answer.status !== 'OK') log().warn({ status: answer.status, error: answer.error }, 'answered Mattermost with a failure');
    else if (logger.isLevelEnabled('debug')) log().debug({ sinks: deliveries.map((d) => `${d.sink.name}:${d.result.kind}`) }, 'notification handled');
    return reply(c, answer);
  });

  api.post('/ack', async (c) => {
    const parsed = parseBody(PushAckSchema, await c.req.text());
    if (!parsed.ok) {
      metrics.invalid('ack', 'invalid_payload');
      logger.warn({ error: parsed.error }, 'rejected an invalid ack payload');
      return reply(c, { status: 'FAIL', error: parsed.error });
    }
    metrics.ack();
    logger.debug({ ack_id: parsed.value.id, type: parsed.value.type, platform: parsed.value.platform }, 'ack');
    return reply(c, { status: 'OK' });
  });
  api.all('/send_push', (c) => c.text('method not allowed: use POST', 405, { Allow: 'POST' }));
  api.all('/ack', (c) => c.text('method not allowed: use POST', 405, { Allow: 'POST' }));

  app.route(`${base}/api/v1`, api);

  app.get('/', (c) => c.html('<html><body>push-relay: a Mattermost push notification relay</body></html>'));
  app.get('/version', (c) => c.json(VERSION));
  app.get('/healthz', (c) => c.json({ status: 'ok' }));
  app.get('/readyz', (c) => {
    const states = Object.fromEntries(sinks.map((s) => [s.name, s.state()]));
    const ready = Object.values(states).every((s) => s.ready);
    return c.json({ status: ready ? 'ready' : 'not ready', sinks: states }, ready ? 200 : 503);
  });
  app.get('/metrics', async (c) =>
    c.body(await metrics.registry.metrics(), 200, { 'Content-Type': metrics.registry.contentType }),
  );

  app.notFound((c) => c.text(`not found: ${c.req.method} ${c.req.path}`, 404));
  app.onError((err, c) => {
    logger.error({ err, path: c.req.path }, 'bug: request handler failed');
    // Still a contract reply: Mattermost logs the text, and we keep serving.
    return c.json({ status: 'FAIL', error: `internal error: ${err.message}` }, 500);
  });

  return Object.assign(app, { inFlight: () => inFlight });
}

function reply(c: Context, body: PushResponse) {
  return c.json(body);
}

/**
 * Mattermost sends `Authorization: Basic` when its push server URL carries userinfo
 * (`https://user:pass@relay/`, contract §1.1): that is the one credential it can present.
 */
function basicAuth(auth: { username: string; password: string }, logger: Logger) {
  const expected = Buffer.from(`Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}`);
  return async (c: Context, next: () => Promise<void>) => {
    const got = Buffer.from(c.req.header('authorization') ?? '');
    if (got.length === expected.length && timingSafeEqual(got, expected)) return next();
    logger.warn({ path: c.req.path }, 'rejected a request without valid credentials (server.auth)');
    return c.text('unauthorized: put user:password in Mattermost\'s push notification server URL', 401, {
      'WWW-Authenticate': 'Basic realm="push-relay"',
    });
  };
}
