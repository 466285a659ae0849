// The email sink against a real SMTP server (smtp-server, in this process, 127.0.0.1): what
// arrives is parsed with mailparser and checked as a mail client would show it.
import { createServer, type Server, type Socket } from 'node:net';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import type { PushNotification } from '../src/contract.js';
import { createDeviceRegistry } from '../src/devices.js';
import { createRegistry, sinkMetrics } from '../src/metrics.js';
import { memoryKv } from '../src/store/index.js';
import { openSqliteStore } from '../src/store/sqlite.js';
import emailSink from '../sinks/email.js';
import type { Outcome } from '../sinks/types.js';
import { testCertificate } from './helpers/certs.js';
import { post } from './helpers/http.js';
import { messagePush, payload } from './helpers/payloads.js';
import { freePort } from './helpers/ports.js';
import { createDatabase, havePostgres } from './helpers/postgres.js';
import { spawnRelay, startTestRelay } from './helpers/relay.js';
import { startSmtpServer, type SmtpServer } from './helpers/smtp.js';
import { tempDir } from './helpers/tmp.js';
import { sleep } from './helpers/wait.js';

const MM = 'https://chat.example.com';
const FROM = 'Mattermost <push@example.com>';

function mailSink(smtp: SmtpServer | string, extra: Record<string, unknown> = {}) {
  return {
    type: 'email',
    smtp: typeof smtp === 'string' ? smtp : `smtp://${smtp.host}:${smtp.port}`,
    from: FROM,
    to: ['ops@example.com'],
    ...extra,
  };
}

async function relayFor(smtp: SmtpServer, extra: Record<string, unknown> = {}, top: Record<string, unknown> = {}, env: Record<string, string> = {}) {
  return startTestRelay({ mattermost: { url: MM }, sinks: { mail: mailSink(smtp, extra) }, ...top }, { env });
}

async function push(relayUrl: string, body: Record<string, unknown>) {
  const reply = await post(`${relayUrl}/api/v1/send_push`, JSON.stringify(body));
  expect(reply.status).toBe(200);
  return reply.json as { status: string; error?: string };
}

let ack = 0;
const fresh = (overrides: Record<string, unknown> = {}) => messagePush({ ack_id: `ack${Date.now()}x${ack++}`, ...overrides });

describe('a notification becomes a mail', () => {
  it('reaches the static recipients with From, To, a UTF-8 subject that decodes back exactly, a text and an HTML part and the permalink', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, { to: ['ops@example.com', 'oncall@example.com'], subject: '{channel_name}' });
    const subject = 'Équipe 🚀 — déploiement';
    expect(await push(relay.url, fresh({ channel_name: subject, post_id: 'q7wmodmqo3gct6hm4eszbu68kh' }))).toEqual({ status: 'OK' });
    const mails = await smtp.waitForMails(2);
    // One mail per recipient: nobody sees who else gets Mattermost's notifications.
    expect(mails.map((m) => m.envelope.to).sort()).toEqual([['oncall@example.com'], ['ops@example.com']]);
    for (const m of mails) {
      expect(m.envelope.from).toBe('push@example.com');
      expect(m.parsed.from?.value).toEqual([{ address: 'push@example.com', name: 'Mattermost' }]);
      const to = Array.isArray(m.parsed.to) ? m.parsed.to : [m.parsed.to];
      expect(to.flatMap((a) => a?.value.map((v) => v.address))).toEqual(m.envelope.to);
      // Encoded on the wire (RFC 2047: header fields are ASCII), decoded back to the same text.
      const header = /^Subject: (.*(?:\r\n[ \t].*)*)/m.exec(m.raw)?.[1] ?? '';
      expect(header).toMatch(/=\?UTF-8\?/i);
      expect(header).not.toMatch(/[^\x20-\x7e\r\n\t]/);
      expect(m.parsed.subject).toBe(subject);
      expect(m.parsed.text).toContain('@alice: Deploy to staging finished, please verify the login flow');
      expect(m.parsed.text).toContain(`${MM}/_redirect/pl/q7wmodmqo3gct6hm4eszbu68kh`);
      expect(m.parsed.html).toContain('@alice: Deploy to staging finished, please verify the login flow');
      expect(m.parsed.html).toContain(`<a href="${MM}/_redirect/pl/q7wmodmqo3gct6hm4eszbu68kh">`);
    }
  });

  it('escapes HTML, quotes and & in the HTML part, keeps them intact in the text part, and never reads a value as a template', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, { html: '<p>{sender_name}: {message}</p>' });
    const message = `<script>alert("x")</script> & 'quoted' "double" {sender_name} {channel_name}`;
    await push(relay.url, fresh({ message, sender_name: 'Bob <b>&</b>' }));
    const [m] = await smtp.waitForMails(1);
    expect(m!.parsed.text).toContain(message);
    expect(m!.parsed.html).toContain(
      '<p>Bob &lt;b&gt;&amp;&lt;/b&gt;: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;quoted&#39; &quot;double&quot; {sender_name} {channel_name}</p>',
    );
    expect(m!.parsed.html).not.toContain('<script>');
    expect(m!.parsed.html).not.toContain('<b>');
  });

  it('never mails clear, update_badge or a test push without text', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp);
    for (const p of ['08', '09', '11']) expect(await push(relay.url, payload(p).json)).toEqual({ status: 'OK' });
    // A clear that carries a message is still not mailed.
    expect(await push(relay.url, { ...payload('08').json, ack_id: 'clear-with-text', message: 'read elsewhere' })).toEqual({ status: 'OK' });
    // Then a real message: it must be the only mail.
    await push(relay.url, fresh());
    await smtp.waitForMails(1);
    await sleep(200);
    expect(smtp.mails).toHaveLength(1);
    expect(smtp.rcptAttempts).toEqual(['ops@example.com']);
  });

  it("mails a paired device's account address (from the registry) besides the static recipients", async () => {
    const dataDir = tempDir();
    const store = openSqliteStore({ dataDir, owner: true });
    const device = await createDeviceRegistry(store.kv('devices')).add({
      label: 'Alice laptop',
      targets: { email: 'alice@example.org' },
      account: { userId: 'u1', username: 'alice', email: 'alice@example.org' },
    });
    await store.close();
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, {}, { store: 'sqlite', dataDir });
    expect(await push(relay.url, fresh({ device_id: device.token }))).toEqual({ status: 'OK' });
    const mails = await smtp.waitForMails(2);
    expect(mails.map((m) => m.envelope.to[0]).sort()).toEqual(['alice@example.org', 'ops@example.com']);
    const alice = mails.find((m) => m.envelope.to[0] === 'alice@example.org')!;
    expect(alice.parsed.to && !Array.isArray(alice.parsed.to) && alice.parsed.to.text).toBe('alice@example.org');
    // An unpaired device id adds nobody.
    await push(relay.url, fresh());
    await smtp.waitForMails(3);
    expect(smtp.mails[2]!.envelope.to).toEqual(['ops@example.com']);
  });
});

describe('digest', () => {
  it('turns five notifications within the window into one mail listing all five', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, { digest: '600ms' });
    for (let i = 1; i <= 5; i++) expect(await push(relay.url, fresh({ message: `digest line ${i}`, channel_name: i % 2 ? 'Town Square' : 'Ops' }))).toEqual({ status: 'OK' });
    expect(smtp.mails).toHaveLength(0);
    const [m] = await smtp.waitForMails(1, 3000);
    await sleep(800);
    expect(smtp.mails).toHaveLength(1);
    expect(m!.parsed.subject).toBe('5 Mattermost notifications (Town Square, Ops)');
    for (let i = 1; i <= 5; i++) {
      expect(m!.parsed.text).toContain(`digest line ${i}`);
      expect(m!.parsed.html).toContain(`digest line ${i}`);
    }
    // In arrival order.
    expect(m!.parsed.text!.indexOf('digest line 1')).toBeLessThan(m!.parsed.text!.indexOf('digest line 5'));
  });

  it('sends five mails for five notifications without a digest', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp);
    for (let i = 1; i <= 5; i++) await push(relay.url, fresh({ message: `single ${i}` }));
    const mails = await smtp.waitForMails(5);
    await sleep(200);
    expect(mails).toHaveLength(5);
    expect(mails.map((m) => m.parsed.text?.trim().split('\n')[0]).sort()).toEqual([1, 2, 3, 4, 5].map((i) => `single ${i}`));
  });

  it('sends a digest the server refused for now (451) on a later try, once', async () => {
    const smtp = await startSmtpServer({ rcpt: (_a, attempt) => (attempt === 1 ? { code: 451, message: '4.7.1 Greylisted' } : undefined) });
    const relay = await relayFor(smtp, { digest: '200ms' });
    for (let i = 1; i <= 2; i++) await push(relay.url, fresh({ message: `held ${i}` }));
    const [m] = await smtp.waitForMails(1, 5000);
    expect(smtp.rcptAttempts).toHaveLength(2);
    expect(m!.parsed.text).toContain('held 1');
    expect(m!.parsed.text).toContain('held 2');
    await sleep(400);
    expect(smtp.mails).toHaveLength(1);
  });

  it('two relays on one PostgreSQL mail a recipient\'s digest once between them', async () => {
    if (!(await havePostgres())) {
      if (process.env.CI === 'true') throw new Error('PostgreSQL is not reachable on 127.0.0.1:5432');
      return console.log('skipped: no PostgreSQL on 127.0.0.1:5432');
    }
    const store = await createDatabase();
    const smtp = await startSmtpServer();
    const relays = [await relayFor(smtp, { digest: '500ms' }, { store }), await relayFor(smtp, { digest: '500ms' }, { store })];
    // Each relay gets pushes for the same recipient at the same moment: both run a timer for it.
    const lines = Array.from({ length: 6 }, (_, i) => `digest line across relays ${i}`);
    await Promise.all(lines.map((message, i) => push(relays[i % 2]!.url, fresh({ message }))));
    await smtp.waitForMails(1, 3000);
    await sleep(1500);
    // Every notification in exactly one mail, whichever relay sent it.
    for (const line of lines) expect(smtp.mails.filter((m) => m.parsed.text?.includes(line)), line).toHaveLength(1);
    for (const r of relays) await r.stop();
  });

  it('keeps pending entries in the store across a restart and sends them after it', async () => {
    const dataDir = tempDir();
    const smtp = await startSmtpServer();
    const first = await relayFor(smtp, { digest: '2s' }, { store: 'sqlite', dataDir });
    await push(first.url, fresh({ message: 'before the restart' }));
    await first.stop();
    expect(smtp.mails).toHaveLength(0);
    const second = await relayFor(smtp, { digest: '300ms' }, { store: 'sqlite', dataDir });
    const [m] = await smtp.waitForMails(1, 3000);
    expect(m!.parsed.text).toContain('before the restart');
    await second.stop();
  });
});

// One test per row of SMTP_OUTCOMES in sinks/email.ts, calling the sink directly.
describe('SMTP outcomes', () => {
  function sink(raw: Record<string, unknown>) {
    const config = emailSink.schema.parse({ type: 'email', from: FROM, to: ['ops@example.com'], ...raw });
    const kv = memoryKv();
    return emailSink.create('mail', config, {
      logger: pino({ level: 'silent' }),
      metrics: sinkMetrics(createRegistry()),
      store: kv('sink:mail'),
      devices: createDeviceRegistry(kv('devices')),
    });
  }
  async function outcome(raw: Record<string, unknown>): Promise<Outcome> {
    const s = sink(raw);
    try {
      return await s.send(messagePush() as unknown as PushNotification, new AbortController().signal);
    } finally {
      await s.close();
    }
  }
  const rawServers: Server[] = [];
  async function rawServer(onConnect: (s: Socket) => void): Promise<number> {
    const server = createServer(onConnect);
    rawServers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return (server.address() as { port: number }).port;
  }
  afterAll(() => {
    for (const s of rawServers) s.close();
  });

  it('4xx (451) is retryable', async () => {
    const smtp = await startSmtpServer({ rcpt: () => ({ code: 451, message: '4.3.0 Mailbox busy, try later' }) });
    expect(await outcome({ smtp: `smtp://127.0.0.1:${smtp.port}` })).toMatchObject({ kind: 'retryable', reason: 'smtp_transient', detail: expect.stringContaining('451 4.3.0 Mailbox busy') });
  });

  it('a refused login (535) is permanent: auth_failed', async () => {
    const smtp = await startSmtpServer({ auth: { user: 'relay', pass: 'right' } });
    expect(await outcome({ smtp: `smtp://relay:wrong@127.0.0.1:${smtp.port}` })).toMatchObject({ kind: 'permanent', reason: 'auth_failed', detail: expect.stringContaining('535') });
  });

  it("5xx (550) is permanent, with the server's answer", async () => {
    const smtp = await startSmtpServer({ rcpt: () => ({ code: 550, message: '5.1.1 User unknown' }) });
    expect(await outcome({ smtp: `smtp://127.0.0.1:${smtp.port}` })).toMatchObject({ kind: 'permanent', reason: 'smtp_rejected', detail: expect.stringContaining('550 5.1.1 User unknown') });
  });

  it('a server that never greets is a retryable timeout', async () => {
    const port = await rawServer(() => {}); // accepts, says nothing
    expect(await outcome({ smtp: `smtp://127.0.0.1:${port}`, timeout: '300ms' })).toMatchObject({ kind: 'retryable', reason: 'timeout' });
  });

  it('a certificate the sink does not trust is a retryable TLS failure', async (ctx) => {
    const cert = testCertificate();
    if (!cert) return ctx.skip();
    const smtp = await startSmtpServer({ tls: cert });
    expect(await outcome({ smtp: `smtp://localhost:${smtp.port}` })).toMatchObject({ kind: 'retryable', reason: 'tls_failed' });
    expect(smtp.mails).toHaveLength(0);
  });

  it('connection refused is retryable', async () => {
    const port = await freePort(); // nothing listens there
    expect(await outcome({ smtp: `smtp://127.0.0.1:${port}` })).toMatchObject({ kind: 'retryable', reason: 'connection_failed' });
  });

  it('anything else (a server speaking no SMTP) is retryable: smtp_error', async () => {
    const port = await rawServer((s) => s.write('HTTP/1.1 400 Bad Request\r\n\r\n'));
    expect(await outcome({ smtp: `smtp://127.0.0.1:${port}`, timeout: '2s' })).toMatchObject({ kind: 'retryable', reason: 'smtp_error' });
  });
});

describe('through the outbox', () => {
  const delivery = { retryMin: '100ms', retryMax: '200ms' };

  it('retries a 451 and delivers the mail once', async () => {
    const smtp = await startSmtpServer({ rcpt: (_a, attempt) => (attempt === 1 ? { code: 451, message: '4.7.1 Greylisted, try again' } : undefined) });
    const relay = await relayFor(smtp, {}, { store: 'sqlite', dataDir: tempDir(), delivery });
    expect(await push(relay.url, fresh({ message: 'greylisted once' }))).toEqual({ status: 'OK' });
    const [m] = await smtp.waitForMails(1, 5000);
    expect(m!.parsed.text).toContain('greylisted once');
    await sleep(500);
    expect(smtp.mails).toHaveLength(1);
    expect(smtp.rcptAttempts).toEqual(['ops@example.com', 'ops@example.com']);
  });

  it('retries only the recipient that was refused for now, so the others get the mail once', async () => {
    const smtp = await startSmtpServer({ rcpt: (a, attempt) => (a === 'oncall@example.com' && attempt === 1 ? { code: 452, message: '4.2.2 Mailbox full' } : undefined) });
    const relay = await relayFor(smtp, { to: ['ops@example.com', 'oncall@example.com'] }, { store: 'sqlite', dataDir: tempDir(), delivery });
    expect(await push(relay.url, fresh({ message: 'to both' }))).toEqual({ status: 'OK' });
    await smtp.waitForMails(2, 5000);
    await sleep(500);
    expect(smtp.mails.map((m) => m.envelope.to[0]).sort()).toEqual(['oncall@example.com', 'ops@example.com']);
    expect(smtp.rcptAttempts.filter((a) => a === 'ops@example.com')).toHaveLength(1);
  });

  it('holds mails over the per-recipient rate limit in the outbox and sends them when the limit allows', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, { rateLimit: { mails: 2, per: '1s' } }, { store: 'sqlite', dataDir: tempDir(), delivery });
    const started = Date.now();
    for (let i = 1; i <= 3; i++) expect(await push(relay.url, fresh({ message: `limited ${i}` }))).toEqual({ status: 'OK' });
    await smtp.waitForMails(2);
    await sleep(100);
    expect(smtp.mails).toHaveLength(2);
    await smtp.waitForMails(3, 5000);
    expect(Date.now() - started).toBeGreaterThanOrEqual(400);
    expect(smtp.mails.map((m) => m.parsed.text?.split('\n')[0]).sort()).toEqual(['limited 1', 'limited 2', 'limited 3']);
  });

  it("answers FAIL naming the server's answer for a 550, keeps a dead letter and never retries", async () => {
    const smtp = await startSmtpServer({ rcpt: () => ({ code: 550, message: '5.1.1 <ops@example.com>: Recipient address rejected' }) });
    const dataDir = tempDir();
    const relay = await relayFor(smtp, {}, { store: 'sqlite', dataDir, delivery });
    const reply = await push(relay.url, fresh());
    expect(reply.status).toBe('FAIL');
    expect(reply.error).toContain('550 5.1.1 <ops@example.com>: Recipient address rejected');
    await sleep(700);
    expect(smtp.rcptAttempts).toHaveLength(1);
    const reader = openSqliteStore({ dataDir, owner: false });
    const dead = await reader.deadLetters(10);
    const stats = await reader.stats();
    await reader.close();
    expect(dead).toHaveLength(1);
    expect(dead[0]!.reason).toContain('550 5.1.1');
    expect(stats.depth).toBe(0);
  });
});

describe('STARTTLS and authentication', () => {
  it('upgrades with STARTTLS to a server whose certificate tls.ca trusts, and logs in with the password from ${SMTP_PASSWORD}', async (ctx) => {
    const cert = testCertificate();
    if (!cert) return ctx.skip();
    const password = 's3cret:pa ss';
    const smtp = await startSmtpServer({ tls: cert, auth: { user: 'relay', pass: password } });
    const relay = await startTestRelay(
      {
        sinks: {
          mail: { type: 'email', smtp: `smtp://relay:\${SMTP_PASSWORD}@localhost:${smtp.port}`, from: FROM, to: 'ops@example.com', tls: { ca: cert.certFile }, requireTLS: true },
        },
      },
      { env: { SMTP_PASSWORD: encodeURIComponent(password) } },
    );
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    const [m] = await smtp.waitForMails(1);
    expect(m!.secure).toBe(true);
    expect(m!.user).toBe('relay');
  });

  it('trusts the server through NODE_EXTRA_CA_CERTS in a relay started as a user runs it', async (ctx) => {
    const cert = testCertificate();
    if (!cert) return ctx.skip();
    const smtp = await startSmtpServer({ tls: cert, auth: { user: 'relay', pass: 'pw' } });
    const relay = await spawnRelay({
      config: {
        store: 'none',
        sinks: { mail: { type: 'email', smtp: `smtp://relay:\${SMTP_PASSWORD}@localhost:${smtp.port}`, from: FROM, to: 'ops@example.com', requireTLS: true } },
      },
      env: { NODE_EXTRA_CA_CERTS: cert.certFile, SMTP_PASSWORD: 'pw' },
    });
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    const [m] = await smtp.waitForMails(1);
    expect(m!.secure).toBe(true);
    // The password never reaches the log.
    await relay.stop();
    expect(relay.lines.join('\n')).not.toContain(':pw@');
  });

  it('speaks TLS from the start for smtps://', async (ctx) => {
    const cert = testCertificate();
    if (!cert) return ctx.skip();
    const smtp = await startSmtpServer({ tls: cert, secure: true });
    const relay = await startTestRelay({
      sinks: { mail: { type: 'email', smtp: `smtps://localhost:${smtp.port}`, from: FROM, to: 'ops@example.com', tls: { ca: cert.certFile } } },
    });
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    const [m] = await smtp.waitForMails(1);
    expect(m!.secure).toBe(true);
  });
});

describe('config', () => {
  it('refuses a recipient that is not a plain address, naming the key', async () => {
    await expect(startTestRelay({ sinks: { mail: { type: 'email', smtp: 'smtp://127.0.0.1:1', from: FROM, to: ['Ops <ops@example.com>'] } } })).rejects.toThrow(
      /sinks\.mail\.to\.0: must be a plain email address/,
    );
  });

  it('answers skipped when nobody is to get the mail', async () => {
    const smtp = await startSmtpServer();
    const relay = await relayFor(smtp, { to: [] });
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    await sleep(150);
    expect(smtp.rcptAttempts).toHaveLength(0);
  });
});
