// Email sink: a mail per notification (or one digest per recipient and window) over SMTP,
// through nodemailer's pooled transport. Recipients are the static `to` list and, for a device
// this relay paired, the address of the Mattermost account it was paired with (set by the
// pairing page only, never typed in by the person). A broadcast sink: it never reports
// dead-token, so it never makes Mattermost forget a device.
import { readTlsCa } from './tls-ca.js';
import { randomUUID } from 'node:crypto';
import nodemailer from 'nodemailer';
import { z } from 'zod';
import { hasText, shortToken, type PushNotification } from '../src/contract.js';
import { isRelayToken } from '../src/devices.js';
import { createRateLimiter, type RateLimiter } from '../src/rate-limit.js';
import { duration, flag, int, sinkSchema, template, url } from '../src/schema.js';
import { compileTemplate, type Render } from '../src/template.js';
import { defineSink, type Outcome, type SinkFactory } from './types.js';

/** A plain address (what `to` and the registry hold); display names belong in `from` only. */
const ADDRESS = /^[^\s@<>,;"]+@[^\s@<>,;"]+\.[^\s@<>,;"]+$|^[^\s@<>,;"]+@localhost$/;
const address = z.string().regex(ADDRESS, { message: 'must be a plain email address (user@example.com)' });

const schema = sinkSchema('email', {
  /** smtp:// (STARTTLS when the server offers it, RFC 3207) or smtps:// (TLS from the start, RFC 8314 §3.3). */
  smtp: url(['smtp', 'smtps']),
  /** Override the URL's user:pass, for passwords that would need URL-encoding. */
  username: z.string().optional(),
  password: z.string().optional(),
  from: z.string().min(1),
  to: z.union([address, z.array(address)]).default([]).transform((v) => (Array.isArray(v) ? v : [v])),
  /** Default: "<sender> in <channel>", or whichever of the two the push carries. */
  subject: template().optional(),
  text: template().default('{message}'),
  /** Every value is HTML-escaped before it is put in. */
  html: template().default('<div style="white-space:pre-wrap">{message}</div>'),
  /** > 0: one recipient's notifications within this window become one mail. */
  digest: duration.default(0),
  /** Per recipient: at most `mails` mails per `per` (a burst of `mails`); beyond it the mail waits in the outbox. */
  rateLimit: z.strictObject({ mails: int(1, 1_000_000), per: duration.refine((v) => v > 0, 'must be > 0') }).optional(),
  /** Refuse to send over a connection that did not upgrade with STARTTLS. */
  requireTLS: flag.default(false),
  tls: z
    .strictObject({
      /** A PEM file of the CA that signed the server's certificate (a private CA). */
      ca: z.string().optional(),
      rejectUnauthorized: flag.default(true),
      /** The name to check the certificate against, when the URL's host is an address. */
      servername: z.string().optional(),
    })
    .optional(),
  pool: z
    .strictObject({ maxConnections: int(1, 100).default(5), maxMessages: int(1, 1_000_000).default(100) })
    .prefault({}),
  /** Connection, greeting and socket inactivity timeout of one SMTP conversation. */
  timeout: duration.default(15_000),
});
export type EmailSinkConfig = z.output<typeof schema>;

/**
 * How an SMTP failure ends, checked top to bottom (one test per row in test/email.test.ts).
 * RFC 5321 §4.2.1: a 4yz reply is a transient negative completion ("the command may be
 * repeated"), a 5yz reply a permanent one. Without a reply, nodemailer's error code says
 * what broke; a network or TLS problem is the server's or the operator's to fix, and the
 * outbox keeps the mail until then (until its ttl).
 */
type SmtpError = Error & { code?: string; responseCode?: number; response?: string; command?: string };
const SMTP_OUTCOMES: ReadonlyArray<{ when: (e: SmtpError) => boolean; kind: 'retryable' | 'permanent'; reason: string }> = [
  { when: (e) => inRange(e.responseCode, 400), kind: 'retryable', reason: 'smtp_transient' }, // 421, 450, 451, 452
  { when: (e) => e.code === 'EAUTH', kind: 'permanent', reason: 'auth_failed' }, // 535 and friends: fix the credentials
  { when: (e) => inRange(e.responseCode, 500), kind: 'permanent', reason: 'smtp_rejected' }, // 550, 553, 554 ...
  { when: (e) => e.code === 'ETIMEDOUT', kind: 'retryable', reason: 'timeout' },
  { when: (e) => e.code === 'ETLS' || /certificate|self[- ]signed|SSL|TLS/i.test(e.message), kind: 'retryable', reason: 'tls_failed' },
  { when: (e) => ['ECONNECTION', 'ESOCKET', 'EDNS', 'EPROXY'].includes(e.code ?? ''), kind: 'retryable', reason: 'connection_failed' },
  { when: () => true, kind: 'retryable', reason: 'smtp_error' },
];
const inRange = (code: number | undefined, base: number) => typeof code === 'number' && code >= base && code < base + 100;

export function smtpOutcome(err: SmtpError): Extract<Outcome, { kind: 'retryable' | 'permanent' }> {
  const row = SMTP_OUTCOMES.find((r) => r.when(err)) as (typeof SMTP_OUTCOMES)[number];
  // The server's own words (e.g. "550 5.1.1 <x@example.com>: user unknown") end up in
  // Mattermost's FAIL error and in the dead letter.
  const said = err.response ? `SMTP server answered${err.command ? ` ${err.command}` : ''}: ${err.response}` : `SMTP ${err.code ?? 'error'}: ${err.message}`;
  return { kind: row.kind, reason: row.reason, detail: said };
}

const DELIVERED: Outcome = { kind: 'delivered' };
const NO_TEXT: Outcome = { kind: 'skipped', reason: 'no_text' };
const NO_RECIPIENTS: Outcome = { kind: 'skipped', reason: 'no_recipients' };
/** Nothing a person would read: never mailed, whatever they carry. */
const SILENT_TYPES = new Set(['clear', 'update_badge']);
const DIGEST_PREFIX = 'digest:';
/** Recipients already done for a notification sent to several, so a retry does not mail them twice. */
const DONE_PREFIX = 'done:';
const DONE_KEEP_MS = 2 * 86_400_000;
/** Who is mailing a recipient's digest right now, so that relays sharing a store mail it once. */
const LEASE_PREFIX = 'lease:';
/** Longer than a digest mail can take (connect, greeting and socket timeouts are 10-60 s). */
const LEASE_MS = 180_000;

export const escapeHtml = (s: string) =>
  s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] as string);

/** `alice@example.com` -> `al***@example.com`: enough for an operator to tell mailboxes apart. */
const masked = (a: string) => a.replace(/^(.{0,2})[^@]*@/, '$1***@');

type Mail = { subject: string; text: string; html: string };
type DigestEntry = { at: number; n: PushNotification };

const createEmailSink: SinkFactory<EmailSinkConfig> = (name, config, ctx) => {
  const { logger: log, store, devices } = ctx;
  const smtp = new URL(config.smtp);
  const secure = smtp.protocol === 'smtps:';
  const user = config.username ?? decodeURIComponent(smtp.username);
  const pass = config.password ?? decodeURIComponent(smtp.password);
  const ca = readTlsCa(name, config.tls?.ca);
  const shown = `${smtp.protocol}//${smtp.hostname}:${smtp.port || (secure ? 465 : 587)}`;
  const transport = nodemailer.createTransport({
    pool: true,
    host: smtp.hostname.replace(/^\[|\]$/g, ''),
    // 587 is the submission port (RFC 6409), 465 submission over TLS (RFC 8314).
    port: smtp.port ? Number(smtp.port) : secure ? 465 : 587,
    secure,
    requireTLS: config.requireTLS,
    ...(user ? { auth: { user, pass } } : {}),
    maxConnections: config.pool.maxConnections,
    maxMessages: config.pool.maxMessages,
    connectionTimeout: config.timeout,
    greetingTimeout: config.timeout,
    socketTimeout: config.timeout,
    tls: {
      rejectUnauthorized: config.tls?.rejectUnauthorized ?? true,
      ...(ca ? { ca } : {}),
      ...(config.tls?.servername ? { servername: config.tls.servername } : {}),
    },
  });

  const subjectOf: Render = config.subject ? compileTemplate(config.subject) : defaultSubject;
  const textOf = compileTemplate(config.text);
  // compileTemplate puts each value in once, escaped, and never reads it as a template again.
  const htmlOf = compileTemplate(config.html, escapeHtml);
  const limiter: RateLimiter | undefined = config.rateLimit
    ? createRateLimiter({ perSecond: config.rateLimit.mails / (config.rateLimit.per / 1000), burst: config.rateLimit.mails })
    : undefined;

  const sent = ctx.metrics.counter({
    name: 'push_relay_email_mails_sent_total',
    help: 'Mails an email sink handed to its SMTP server, by kind (single notification or digest).',
    labelNames: ['sink', 'kind'],
  });
  const dropped = ctx.metrics.counter({
    name: 'push_relay_email_digest_entries_dropped_total',
    help: 'Notifications waiting in a digest that the SMTP server refused for good (5xx): logged, not mailed.',
    labelNames: ['sink'],
  });
  for (const k of ['single', 'digest']) sent.labels(name, k).inc(0);
  dropped.labels(name).inc(0);

  function link(n: PushNotification): string | undefined {
    const base = ctx.mattermostUrl;
    if (!base) return undefined;
    // Mattermost's web app serves /_redirect/pl/<post_id>, which finds the post's team.
    return n.post_id ? `${base}/_redirect/pl/${encodeURIComponent(n.post_id)}` : base;
  }

  function render(n: PushNotification): Mail {
    const href = link(n);
    const subject = oneLine(subjectOf(n)) || 'Mattermost notification';
    const text = textOf(n) + (href ? `\n\nOpen in Mattermost: ${href}\n` : '\n');
    const html = htmlOf(n) + (href ? `\n<p><a href="${escapeHtml(href)}">Open in Mattermost</a></p>` : '');
    return { subject, text, html: htmlDocument(html) };
  }

  function renderDigest(entries: DigestEntry[]): Mail {
    if (entries.length === 1) return render((entries[0] as DigestEntry).n);
    const channels = [...new Set(entries.map((e) => e.n.channel_name).filter((c): c is string => !!c))];
    const subject = oneLine(
      `${entries.length} Mattermost notifications${channels.length ? ` (${channels.slice(0, 3).join(', ')}${channels.length > 3 ? ', ...' : ''})` : ''}`,
    );
    const text: string[] = [];
    const html: string[] = [];
    for (const { at, n } of entries) {
      const href = link(n);
      const heading = `${oneLine(subjectOf(n)) || 'Mattermost'} (${clock(at)})`;
      text.push(`${heading}\n${textOf(n)}${href ? `\n${href}` : ''}`);
      html.push(
        `<h3 style="margin-bottom:0.2em">${escapeHtml(heading)}</h3>\n${htmlOf(n)}` +
          (href ? `\n<p><a href="${escapeHtml(href)}">Open in Mattermost</a></p>` : ''),
      );
    }
    return { subject, text: `${text.join('\n\n')}\n`, html: htmlDocument(html.join('\n<hr>\n')) };
  }

  async function mail(to: string, m: Mail): Promise<Outcome> {
    try {
      await transport.sendMail({ from: config.from, to, subject: m.subject, text: m.text, html: m.html });
      return DELIVERED;
    } catch (err) {
      return smtpOutcome(err as SmtpError);
    }
  }

  async function recipients(n: PushNotification): Promise<string[]> {
    const list = [...config.to];
    if (isRelayToken(n.device_id)) {
      const device = await devices.get(n.device_id);
      const own = device?.targets.email;
      if (own && ADDRESS.test(own)) list.push(own);
      else if (own) log.warn({ device: shortToken(n.device_id) }, 'device has an email target that is not a plain address; not mailed');
    }
    const seen = new Set<string>();
    return list.filter((a) => {
      const key = a.toLowerCase();
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
  }

  // ---- single mails ----

  async function sendEach(n: PushNotification, to: string[]): Promise<Outcome> {
    const m = render(n);
    // With several recipients a retry must not mail the ones that already have it.
    const doneKey = to.length > 1 && n.ack_id ? `${DONE_PREFIX}${n.ack_id}` : undefined;
    const done = new Set<string>(doneKey ? (JSON.parse((await store.get(doneKey)) ?? '{"to":[]}') as { to: string[] }).to : []);
    const results = await Promise.all(
      to.map(async (rcpt): Promise<[string, Outcome]> => {
        if (done.has(rcpt)) return [rcpt, DELIVERED];
        if (limiter && !limiter.take(rcpt)) {
          const wait = limiter.retryAfter(rcpt);
          return [rcpt, { kind: 'retryable', reason: 'rate_limited', detail: `more than ${config.rateLimit?.mails} mails to one recipient per ${config.rateLimit?.per} ms`, retryAfterMs: wait * 1000 }];
        }
        const o = await mail(rcpt, m);
        if (o.kind === 'delivered') sent.labels(name, 'single').inc();
        return [rcpt, o];
      }),
    );
    const failed = results.filter(([, o]) => o.kind !== 'delivered');
    for (const [rcpt, o] of failed) {
      if (o.kind !== 'permanent' || to.length === 1) continue;
      // One refused mailbox must not hold the others back: it is logged and counted as done.
      log.warn({ to: masked(rcpt), reason: o.reason, detail: o.detail }, 'SMTP server refused one recipient for good');
    }
    const retry = failed.filter(([, o]) => o.kind === 'retryable');
    if (doneKey) {
      const nowDone = results.filter(([, o]) => o.kind !== 'retryable').map(([r]) => r);
      if (retry.length === 0) await store.delete(doneKey);
      else if (nowDone.length > done.size) await store.set(doneKey, JSON.stringify({ at: Date.now(), to: nowDone }));
    }
    if (retry.length) return summarise(retry, 'retryable');
    if (failed.length) return summarise(failed, 'permanent');
    return DELIVERED;
  }

  // ---- digests ----
  //
  // Durability: each notification for a digest is written to the sink's own store namespace
  // (SQLite or PostgreSQL with the outbox; memory with `store: none`) before the sink answers
  // `delivered`, so Mattermost's OK means "will be mailed". A timer per recipient sends the
  // window's entries as one mail and only then deletes them; a crash or restart finds them in
  // the store and sends them on start. The alternative, answering `retryable` until the
  // digest mail is out, would park every push in the outbox as a failure, retry each one on
  // its own backoff and let the ttl, not the window, decide when mail goes out.
  // Several relays sharing one PostgreSQL store each run their own timers; a flush first takes
  // the recipient's lease in the store (compare-and-set), so one of them mails the entries and
  // the others find them gone. A lease whose holder died runs out after LEASE_MS.
  const instance = randomUUID();
  const timers = new Map<string, NodeJS.Timeout>();
  const failures = new Map<string, number>();
  const flushing = new Map<string, Promise<void>>();
  let closed = false;
  const digestKey = (rcpt: string) => `${DIGEST_PREFIX}${encodeURIComponent(rcpt)}:`;

  function schedule(rcpt: string, inMs: number) {
    if (closed || timers.has(rcpt)) return;
    const t = setTimeout(() => {
      timers.delete(rcpt);
      // One flush per recipient at a time: two would list the same entries and mail them twice.
      const run: Promise<void> = (flushing.get(rcpt) ?? Promise.resolve())
        .then(() => flush(rcpt))
        .catch((err: unknown) => log.error({ err: (err as Error).message }, 'digest flush failed'))
        .finally(() => flushing.get(rcpt) === run && flushing.delete(rcpt));
      flushing.set(rcpt, run);
    }, Math.max(0, inMs));
    t.unref();
    timers.set(rcpt, t);
  }

  /** The lease on `rcpt`'s digest, or undefined while another relay holds it. */
  async function takeLease(rcpt: string): Promise<{ release(): Promise<void> } | undefined> {
    const key = `${LEASE_PREFIX}${encodeURIComponent(rcpt)}`;
    const current = await store.get(key);
    if (current !== undefined) {
      const held = (() => {
        try {
          return JSON.parse(current) as { owner: string; until: number };
        } catch {
          return undefined;
        }
      })();
      if (held && held.until > Date.now()) return undefined;
    }
    const mine = JSON.stringify({ owner: instance, until: Date.now() + LEASE_MS });
    if (!(await store.swap(key, current, mine))) return undefined;
    return { release: () => store.swap(key, mine, undefined).then(() => undefined) };
  }

  async function flush(rcpt: string): Promise<void> {
    let lease: { release(): Promise<void> } | undefined;
    try {
      lease = await takeLease(rcpt);
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot take the digest lease; trying again in a minute');
      return schedule(rcpt, 60_000);
    }
    // Another relay is mailing this recipient's digest: it takes what is there; look again later
    // in case it dies before it is done.
    if (!lease) return schedule(rcpt, Math.max(config.digest, 5_000));
    try {
      await flushHeld(rcpt);
    } finally {
      await lease.release().catch((err: unknown) => log.warn({ err: (err as Error).message }, 'cannot release the digest lease; it runs out by itself'));
    }
  }

  async function flushHeld(rcpt: string): Promise<void> {
    let rows: Array<[string, string]>;
    try {
      rows = await store.list(digestKey(rcpt));
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot read pending digest entries; trying again in a minute');
      return schedule(rcpt, 60_000);
    }
    if (rows.length === 0) return;
    const entries = rows.flatMap(([key, v]) => {
      try {
        return [{ key, ...(JSON.parse(v) as DigestEntry) }];
      } catch {
        return [];
      }
    });
    entries.sort((a, b) => a.at - b.at);
    const outcome = entries.length ? await mail(rcpt, renderDigest(entries)) : DELIVERED;
    if (outcome.kind === 'retryable') {
      const attempts = (failures.get(rcpt) ?? 0) + 1;
      failures.set(rcpt, attempts);
      const wait = Math.min(3_600_000, Math.max(1000, config.digest) * 2 ** Math.min(attempts - 1, 12));
      log.warn({ to: masked(rcpt), reason: outcome.reason, detail: outcome.detail, retryInMs: wait }, 'digest mail not sent; will try again');
      return schedule(rcpt, wait);
    }
    failures.delete(rcpt);
    if (outcome.kind === 'delivered') sent.labels(name, 'digest').inc();
    else {
      dropped.labels(name).inc(entries.length);
      log.error({ to: masked(rcpt), entries: entries.length, reason: 'reason' in outcome ? outcome.reason : '', detail: 'detail' in outcome ? outcome.detail : '' }, 'SMTP server refused the digest mail for good; its notifications are dropped');
    }
    await Promise.all(rows.map(([key]) => store.delete(key)));
    // Entries that arrived while this mail was being sent start the next window.
    const left = await store.list(digestKey(rcpt)).catch(() => []);
    if (left.length) schedule(rcpt, config.digest);
  }

  async function addToDigest(n: PushNotification, to: string[]): Promise<Outcome> {
    const at = Date.now();
    const value = JSON.stringify({ at, n } satisfies DigestEntry);
    // The ack_id in the key makes a resend of the same push overwrite its entry, not add one.
    const id = n.ack_id || randomUUID();
    await Promise.all(to.map((rcpt) => store.set(`${digestKey(rcpt)}${id}`, value)));
    for (const rcpt of to) schedule(rcpt, config.digest);
    return DELIVERED;
  }

  async function resume() {
    const now = Date.now();
    const pending = new Map<string, number>();
    for (const [key, v] of await store.list(DIGEST_PREFIX)) {
      const rcpt = decodeURIComponent(key.slice(DIGEST_PREFIX.length, key.indexOf(':', DIGEST_PREFIX.length)));
      let at = now;
      try {
        at = (JSON.parse(v) as DigestEntry).at;
      } catch {
        /* a broken entry is dropped by the flush that skips it */
      }
      pending.set(rcpt, Math.min(pending.get(rcpt) ?? at, at));
    }
    for (const [rcpt, first] of pending) schedule(rcpt, first + config.digest - now);
    if (pending.size) log.info({ recipients: pending.size }, 'digests left by the previous run will be sent');
    // Markers of multi-recipient sends whose retries are long over.
    for (const [key, v] of await store.list(DONE_PREFIX)) {
      try {
        if ((JSON.parse(v) as { at: number }).at < now - DONE_KEEP_MS) await store.delete(key);
      } catch {
        await store.delete(key);
      }
    }
  }

  return {
    name,
    type: 'email',
    perDevice: false,
    reasons: [
      ['delivered', ''],
      ['skipped', 'no_text'],
      ['skipped', 'no_recipients'],
      ['retryable', 'rate_limited'],
      ...SMTP_OUTCOMES.map((r) => [r.kind, r.reason] as const),
    ],

    async start() {
      await resume().catch((err) => log.error({ err: (err as Error).message }, 'cannot read pending digests'));
      // Not awaited: an SMTP server that is down must not stop the relay; sends report it.
      transport.verify().then(
        () => log.info({ smtp: shown }, 'SMTP server reachable'),
        (err: SmtpError) => log.warn({ smtp: shown, detail: smtpOutcome(err).detail }, 'SMTP server not reachable yet; mails wait in the outbox'),
      );
    },

    // Connections are made per mail: a server that is down shows as retryable sends, and the
    // outbox (which only works for ready sinks) keeps retrying them.
    state: () => ({ ready: true, state: 'ready' }),

    async send(n: PushNotification): Promise<Outcome> {
      if (!hasText(n) || SILENT_TYPES.has(n.type ?? '')) return NO_TEXT;
      const to = await recipients(n);
      if (to.length === 0) return NO_RECIPIENTS;
      return config.digest > 0 ? addToDigest(n, to) : sendEach(n, to);
    },

    async close() {
      closed = true;
      for (const t of timers.values()) clearTimeout(t);
      timers.clear();
      // Pending digest entries stay in the store for the next start; a flush under way finishes.
      await Promise.race([Promise.all(flushing.values()), new Promise((r) => setTimeout(r, 2000).unref())]);
      transport.close();
    },
  };
};

function defaultSubject(n: PushNotification): string {
  if (n.type === 'session') return 'Mattermost: session expired';
  if (n.sender_name && n.channel_name && n.sender_name !== n.channel_name) return `${n.sender_name} in ${n.channel_name}`;
  return n.channel_name || n.sender_name || 'Mattermost notification';
}

/** A header value on one line (nodemailer encodes it; line breaks would only be folded away). */
const oneLine = (s: string) => s.replace(/[\r\n\t]+/g, ' ').trim();

const clock = (at: number) => `${new Date(at).toISOString().slice(11, 16)} UTC`;

const htmlDocument = (body: string) =>
  `<!doctype html>\n<html><head><meta charset="utf-8"></head><body style="font-family:sans-serif">\n${body}\n</body></html>\n`;

function summarise(failed: Array<[string, Outcome]>, kind: 'retryable' | 'permanent'): Outcome {
  const [, first] = failed[0] as [string, Outcome & { reason: string; detail?: string }];
  const detail = failed.map(([rcpt, o]) => `${masked(rcpt)}: ${('detail' in o && o.detail) || ('reason' in o ? o.reason : '')}`).join('; ');
  const retryAfterMs = Math.max(0, ...failed.map(([, o]) => (o.kind === 'retryable' ? (o.retryAfterMs ?? 0) : 0)));
  return kind === 'retryable'
    ? { kind, reason: first.reason, detail, ...(retryAfterMs ? { retryAfterMs } : {}) }
    : { kind, reason: first.reason, detail };
}

export default defineSink({ type: 'email', schema, create: createEmailSink });
