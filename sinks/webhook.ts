// Webhook sink: one HTTP request per notification, to ntfy, gotify or any endpoint. The URL may
// be a template; the body is what the preset's service documents, or for `generic` the
// notification as JSON, a form or a template. A paired device's own ntfy topic gets it too
// (preset ntfy). A broadcast sink: it never reports dead-token.
//
// Egress: the URL is checked before each request (https and public addresses only, unless
// `allowPrivateEndpoints`), the agents' lookup refuses private addresses at connect time
// (DNS rebinding), and redirects are never followed (node:http does not follow them; a 3xx
// is reported with its Location).
import { readTlsCa } from './tls-ca.js';
import { retryAfter } from './retry-after.js';
import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { z } from 'zod';
import { hasText, type PushNotification } from '../src/contract.js';
import { isRelayToken } from '../src/devices.js';
import { checkEndpoint, guardedLookup } from '../src/egress.js';
import { duration, flag, sinkSchema, template } from '../src/schema.js';
import { compileTemplate, PLACEHOLDERS, type Render } from '../src/template.js';
import { VERSION } from '../src/version.js';
import { defineSink, type Outcome, type SinkFactory } from './types.js';

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/; // RFC 9110 §5.6.2 token
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/; // RFC 9110 §5.5: no CR, LF or NUL

/** The URL template with every placeholder filled in, to check what it can become. */
const sample = (t: string) => t.replace(new RegExp(`\\{(${PLACEHOLDERS.join('|')})\\}`, 'g'), 'x');
const isHttpUrl = (t: string) => {
  try {
    return ['http:', 'https:'].includes(new URL(sample(t)).protocol);
  } catch {
    return false;
  }
};

const schema = sinkSchema('webhook', {
  preset: z.enum(['generic', 'ntfy', 'gotify']).default('generic'),
  /** Placeholders are URL-encoded. ntfy: the topic URL; gotify: the server's base URL. */
  url: template(encodeURIComponent).refine(isHttpUrl, { message: 'must be an http:// or https:// URL' }),
  method: z.enum(['POST', 'PUT']).default('POST'),
  headers: z
    .record(
      z.string().regex(HEADER_NAME, { message: 'not a valid header name' }),
      z.string().regex(HEADER_VALUE, { message: 'a header value may not contain line breaks or NUL' }),
    )
    .default({}),
  /** generic only: the notification as JSON, as a form, or the `template` rendered. */
  body: z.enum(['json', 'form', 'template']).optional(),
  /** generic with body: template: the request body. ntfy / gotify: the message text (default: the push's text). */
  template: template().optional(),
  /** How values are put into `template`: as they are, or escaped for a JSON string. */
  escape: z.enum(['none', 'json']).default('none'),
  /** The notification's title for ntfy / gotify (default: the channel, else the sender, else "Mattermost"). */
  title: template().optional(),
  /** ntfy: sent as `Authorization: Bearer <token>`; gotify: the application token, as X-Gotify-Key; generic: Bearer. */
  token: z.string().min(1).optional(),
  allowPrivateEndpoints: flag.default(false),
  /** The whole request, connection to last byte of the answer. */
  timeout: duration.default(10_000),
  /** A private CA for an https endpoint (NODE_EXTRA_CA_CERTS works as well). */
  tls: z.strictObject({ ca: z.string().optional(), rejectUnauthorized: flag.default(true) }).optional(),
}).superRefine((sink, ctx) => {
  if (sink.body && sink.preset !== 'generic') {
    ctx.addIssue({ code: 'custom', path: ['body'], message: `preset ${sink.preset} has its own body; body is for preset generic` });
  }
  if (sink.body === 'template' && !sink.template) {
    ctx.addIssue({ code: 'custom', path: ['template'], message: 'required when body is template' });
  }
  if (sink.preset === 'ntfy' && isHttpUrl(sink.url)) {
    if (!/[^/]$/.test(new URL(sample(sink.url)).pathname)) ctx.addIssue({ code: 'custom', path: ['url'], message: 'ntfy needs the topic URL, e.g. https://ntfy.example.com/mattermost' });
  }
});
export type WebhookSinkConfig = z.output<typeof schema>;

/**
 * HTTP answers -> outcomes (RFC 9110 §15), one test per row in test/webhook.test.ts.
 * 408 and 429 say "not now" (RFC 9110 §15.5.9, RFC 6585 §4), so they are retried, after
 * Retry-After when given; every other 4xx means this request will never be accepted.
 */
export function httpOutcome(status: number, headers: IncomingHttpHeaders, body: string): Outcome {
  const said = `HTTP ${status}${body ? `: ${body.slice(0, 300)}` : ''}`;
  if (status >= 200 && status < 300) return DELIVERED;
  if (status >= 300 && status < 400) {
    return { kind: 'permanent', reason: 'redirect', detail: `HTTP ${status} redirect to ${headers.location ?? '(no Location)'}: not followed; configure the final URL` };
  }
  const retryAfterMs = retryAfter(headers['retry-after']);
  const wait = retryAfterMs !== undefined ? { retryAfterMs } : {};
  if (status === 408) return { kind: 'retryable', reason: 'request_timeout', detail: said, ...wait };
  if (status === 429) return { kind: 'retryable', reason: 'rate_limited', detail: said, ...wait };
  if (status >= 400 && status < 500) return { kind: 'permanent', reason: 'client_error', detail: said };
  if (status >= 500 && status < 600) return { kind: 'retryable', reason: 'server_error', detail: said, ...wait };
  return { kind: 'retryable', reason: 'unexpected_status', detail: said };
}

/** Network failures -> outcomes: a refused private address is the config's problem; the rest may pass. */
export function networkOutcome(err: NodeJS.ErrnoException): Outcome {
  const detail = `${err.code ?? 'error'}: ${err.message}`;
  if (err.code === 'EPRIVATEADDRESS') return { kind: 'permanent', reason: 'private_address', detail };
  if (err.code === 'ETIMEDOUT') return { kind: 'retryable', reason: 'timeout', detail };
  if (/CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO_VERIFY/.test(err.code ?? '')) return { kind: 'retryable', reason: 'tls_failed', detail };
  return { kind: 'retryable', reason: 'connection_failed', detail };
}


const DELIVERED: Outcome = { kind: 'delivered' };
const NOTHING_TO_SHOW: Outcome = { kind: 'skipped', reason: 'nothing_to_show' };
const NO_TEXT: Outcome = { kind: 'skipped', reason: 'no_text' };
const DONE_PREFIX = 'done:';
const DONE_KEEP_MS = 2 * 86_400_000;
const MAX_ANSWER = 4096;

/**
 * Priority by push type. ntfy: 1 min, 3 default, 4 high, 5 max (docs.ntfy.sh/publish,
 * "Message priority"); gotify: 0-10, its Android app sounds from 4 and pops up from 8
 * (gotify.net/docs/msgextras). A message is high, a ringing call max, the rest default.
 */
function priority(n: PushNotification): { ntfy: number; gotify: number } {
  if (n.type === 'message' && n.sub_type === 'calls') return { ntfy: 5, gotify: 10 };
  if (n.type === 'message') return { ntfy: 4, gotify: 8 };
  return { ntfy: 3, gotify: 5 };
}

/** ntfy tags that are emoji short codes show as an emoji before the title. */
function ntfyTags(n: PushNotification): string[] {
  if (n.type === 'message') return [n.sub_type === 'calls' ? 'telephone_receiver' : 'speech_balloon'];
  if (n.type === 'session') return ['lock'];
  if (n.type === 'test') return ['white_check_mark'];
  return [];
}

/** The text a phone shows; undefined for pushes that show nothing (clear, update_badge). */
function shownText(n: PushNotification, render?: Render): string | undefined {
  if (n.type === 'clear' || n.type === 'update_badge') return undefined;
  if (hasText(n)) return render ? render(n) : n.message;
  // Mattermost's "Send a test notification" carries no text: show that it arrived.
  if (n.type === 'test') return 'Test notification from Mattermost';
  if (n.type === 'session') return 'Your Mattermost session expired: log in again to keep receiving notifications.';
  return undefined;
}

const defaultTitle = (n: PushNotification) => n.channel_name || n.sender_name || 'Mattermost';

type Request = { url: URL; headers: Record<string, string>; body: Buffer };
/** `key` identifies the target in the store; `label` names it in errors. */
type Target = { key: string; label: string; req: Request };

const createWebhookSink: SinkFactory<WebhookSinkConfig> = (name, config, ctx) => {
  const { logger: log, store, devices } = ctx;
  const urlOf = compileTemplate(config.url, encodeURIComponent);
  const titleOf = config.title ? compileTemplate(config.title) : defaultTitle;
  const escape = config.escape === 'json' ? (s: string) => JSON.stringify(s).slice(1, -1) : undefined;
  const templateOf = config.template ? compileTemplate(config.template, escape) : undefined;
  const allow = config.allowPrivateEndpoints;
  const ca = readTlsCa(name, config.tls?.ca);
  // One pair of keep-alive agents per sink; their lookup refuses private addresses at connect.
  const lookup = guardedLookup(allow);
  const agents = {
    http: new HttpAgent({ keepAlive: true, maxSockets: 64, lookup } as ConstructorParameters<typeof HttpAgent>[0]),
    https: new HttpsAgent({ keepAlive: true, maxSockets: 64, lookup, ca, rejectUnauthorized: config.tls?.rejectUnauthorized ?? true }),
  };
  const userAgent = `push-relay/${VERSION.version}`;

  function link(n: PushNotification): string | undefined {
    const base = ctx.mattermostUrl;
    if (!base) return undefined;
    // Mattermost's web app serves /_redirect/pl/<post_id>, which finds the post's team.
    return n.post_id ? `${base}/_redirect/pl/${encodeURIComponent(n.post_id)}` : base;
  }

  const baseHeaders = (extra: Record<string, string>): Record<string, string> => ({ 'User-Agent': userAgent, ...config.headers, ...extra });

  /** ntfy's JSON publishing: POST to the server's root with the topic in the body (docs.ntfy.sh/publish, "Publish as JSON"). */
  function ntfyRequest(topicUrl: string, n: PushNotification, text: string, withAuth: boolean): Request {
    const u = new URL(topicUrl);
    const segments = u.pathname.split('/');
    const topic = decodeURIComponent(segments.pop() ?? '');
    const root = new URL(`${segments.join('/')}/`, u);
    root.search = u.search; // ntfy also takes ?auth=<base64> (docs.ntfy.sh/publish, "Query param")
    const click = link(n);
    const message = {
      topic,
      title: titleOf(n),
      message: text,
      priority: priority(n).ntfy,
      tags: ntfyTags(n),
      ...(click ? { click } : {}),
    };
    const auth: Record<string, string> = withAuth && config.token ? { Authorization: `Bearer ${config.token}` } : {};
    return {
      url: root,
      headers: withAuth ? baseHeaders({ 'Content-Type': 'application/json', ...auth }) : { 'User-Agent': userAgent, 'Content-Type': 'application/json' },
      body: Buffer.from(JSON.stringify(message)),
    };
  }

  /** gotify: POST /message with the application token (gotify.net/docs/pushmsg, /docs/msgextras). */
  function gotifyRequest(baseUrl: string, n: PushNotification, text: string): Request {
    const u = new URL(baseUrl);
    if (!/\/message\/?$/.test(u.pathname)) u.pathname = `${u.pathname.replace(/\/+$/, '')}/message`;
    const click = link(n);
    const message = {
      title: titleOf(n),
      message: text,
      priority: priority(n).gotify,
      extras: {
        // Mattermost messages are Markdown.
        'client::display': { contentType: 'text/markdown' },
        ...(click ? { 'client::notification': { click: { url: click } } } : {}),
      },
    };
    const auth: Record<string, string> = config.token ? { 'X-Gotify-Key': config.token } : {};
    return { url: u, headers: baseHeaders({ 'Content-Type': 'application/json', ...auth }), body: Buffer.from(JSON.stringify(message)) };
  }

  function genericRequest(target: string, n: PushNotification): Request | Outcome {
    const auth: Record<string, string> = config.token ? { Authorization: `Bearer ${config.token}` } : {};
    const url = new URL(target);
    switch (config.body ?? 'json') {
      case 'json':
        return { url, headers: baseHeaders({ 'Content-Type': 'application/json', ...auth }), body: Buffer.from(JSON.stringify(n)) };
      case 'form': {
        const form = new URLSearchParams();
        for (const [k, v] of Object.entries(n)) if (v !== undefined && v !== null && typeof v !== 'object') form.set(k, String(v));
        return { url, headers: baseHeaders({ 'Content-Type': 'application/x-www-form-urlencoded', ...auth }), body: Buffer.from(form.toString()) };
      }
      case 'template':
        if (!hasText(n)) return NO_TEXT;
        return {
          url,
          headers: baseHeaders({ 'Content-Type': config.escape === 'json' ? 'application/json' : 'text/plain; charset=utf-8', ...auth }),
          body: Buffer.from((templateOf as Render)(n)),
        };
    }
  }

  function send(r: Request): Promise<Outcome> {
    return new Promise((resolve) => {
      const https = r.url.protocol === 'https:';
      let settled = false;
      const done = (o: Outcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(o);
      };
      const req = (https ? httpsRequest : httpRequest)(
        r.url,
        { method: config.method, headers: { ...r.headers, 'Content-Length': String(r.body.length) }, agent: https ? agents.https : agents.http },
        (res) => {
          const chunks: Buffer[] = [];
          let size = 0;
          res.on('data', (c: Buffer) => {
            if (size < MAX_ANSWER) chunks.push(c);
            size += c.length;
          });
          res.on('error', (err) => done(networkOutcome(err)));
          res.on('end', () => done(httpOutcome(res.statusCode ?? 0, res.headers, Buffer.concat(chunks).toString('utf8', 0, MAX_ANSWER).trim())));
        },
      );
      // The request's own bound. The delivery deadline is not used to abort: a request that
      // outlives it stays in flight, and if it succeeds the dispatcher takes back the outbox
      // copy made at the deadline, so the endpoint gets the notification once.
      const timer = setTimeout(() => {
        req.destroy(Object.assign(new Error(`no answer within ${config.timeout} ms`), { code: 'ETIMEDOUT' }));
      }, config.timeout);
      req.on('error', (err: NodeJS.ErrnoException) => done(networkOutcome(err)));
      req.end(r.body);
    });
  }

  async function guarded(r: Request): Promise<Outcome> {
    const check = await checkEndpoint(r.url.href, allow);
    if (!check.ok) return { kind: 'permanent', reason: 'endpoint_refused', detail: `${redact(r.url)}: ${check.reason}` };
    return send(r);
  }

  /** Where this notification goes: the configured URL, and a paired device's own ntfy topic. */
  async function requests(n: PushNotification): Promise<Target[] | Outcome> {
    let target: string;
    try {
      target = urlOf(n);
      new URL(target);
    } catch {
      return { kind: 'permanent', reason: 'bad_url', detail: 'the url template did not render to a URL' };
    }
    if (config.preset === 'generic') {
      const r = genericRequest(target, n);
      return 'kind' in r ? r : [{ key: target, label: redact(r.url), req: r }];
    }
    const text = shownText(n, templateOf);
    if (text === undefined) return n.type === 'clear' || n.type === 'update_badge' ? NOTHING_TO_SHOW : NO_TEXT;
    if (config.preset === 'gotify') {
      const r = gotifyRequest(target, n, text);
      return [{ key: target, label: redact(r.url), req: r }];
    }
    const main = ntfyRequest(target, n, text, true);
    const out: Target[] = [{ key: target, label: `${redact(main.url)} (topic ${JSON.stringify(JSON.parse(main.body.toString()).topic)})`, req: main }];
    if (isRelayToken(n.device_id)) {
      const own = (await devices.get(n.device_id))?.targets.ntfy;
      if (own && own !== target) {
        try {
          // The sink's headers and token are for the sink's server: a topic on another server
          // (the person's own choice) must not receive the operator's credentials.
          // Its topic is the person's secret: errors name it only as theirs.
          out.push({ key: own, label: "the paired device's ntfy topic", req: ntfyRequest(own, n, text, new URL(own).origin === new URL(target).origin) });
        } catch {
          log.warn('paired device has an ntfy target that is not a URL; skipped');
        }
      }
    }
    return out;
  }

  return {
    name,
    type: 'webhook',
    perDevice: false,
    reasons: [
      ['delivered', ''],
      ['skipped', 'nothing_to_show'],
      ['skipped', 'no_text'],
      ['permanent', 'redirect'],
      ['permanent', 'client_error'],
      ['permanent', 'endpoint_refused'],
      ['permanent', 'private_address'],
      ['permanent', 'bad_url'],
      ['retryable', 'request_timeout'],
      ['retryable', 'rate_limited'],
      ['retryable', 'server_error'],
      ['retryable', 'unexpected_status'],
      ['retryable', 'timeout'],
      ['retryable', 'tls_failed'],
      ['retryable', 'connection_failed'],
    ],

    async start() {
      // Markers of multi-target sends whose retries are long over.
      const now = Date.now();
      for (const [key, v] of await store.list(DONE_PREFIX).catch(() => [])) {
        const at = Number((JSON.parse(v) as { at?: number }).at ?? 0);
        if (at < now - DONE_KEEP_MS) await store.delete(key).catch(() => {});
      }
    },

    state: () => ({ ready: true, state: 'ready' }),

    async send(n: PushNotification): Promise<Outcome> {
      const planned = await requests(n);
      if (!Array.isArray(planned)) return planned;
      if (planned.length === 1) return guarded((planned[0] as Target).req);
      // Several targets: a retry must not post again to those that already took it.
      const doneKey = n.ack_id ? `${DONE_PREFIX}${n.ack_id}` : undefined;
      const done = new Set<string>(doneKey ? (JSON.parse((await store.get(doneKey)) ?? '{"targets":[]}') as { targets: string[] }).targets : []);
      const results = await Promise.all(planned.map(async (t): Promise<[Target, Outcome]> => [t, done.has(t.key) ? DELIVERED : await guarded(t.req)]));
      const retry = results.filter(([, o]) => o.kind === 'retryable');
      const failed = results.filter(([, o]) => o.kind !== 'delivered');
      if (doneKey) {
        const nowDone = results.filter(([, o]) => o.kind !== 'retryable').map(([t]) => t.key);
        if (retry.length === 0) await store.delete(doneKey);
        else if (nowDone.length > done.size) await store.set(doneKey, JSON.stringify({ at: Date.now(), targets: nowDone }));
      }
      const worst = (retry[0] ?? failed[0])?.[1];
      if (!worst) return DELIVERED;
      const detail = failed.map(([t, o]) => `${t.label}: ${'detail' in o ? o.detail : ''}`).join('; ');
      return { ...worst, detail } as Outcome;
    },

    async close() {
      agents.http.destroy();
      agents.https.destroy();
    },
  };
};

/** A URL for logs and errors: no query (gotify tokens live there), no credentials. */
function redact(u: URL): string {
  return `${u.origin}${u.pathname}${u.search ? '?…' : ''}`;
}

export default defineSink({ type: 'webhook', schema, create: createWebhookSink });
