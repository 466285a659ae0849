// A real SMTP server in this process (smtp-server) on 127.0.0.1 and a random port, keeping
// every mail it accepts parsed with mailparser, as a mail client would show it. What it
// answers is the test's to choose: refuse a recipient with any SMTP reply, ask for
// authentication, offer STARTTLS with a certificate made at run time, or speak TLS at once.
import { simpleParser, type ParsedMail } from 'mailparser';
import type { AddressInfo } from 'node:net';
import { SMTPServer, type SMTPServerAddress, type SMTPServerSession } from 'smtp-server';
import { afterAll } from 'vitest';
import { until } from './wait.js';

export type ReceivedMail = {
  /** The SMTP envelope: MAIL FROM and every RCPT TO the server accepted. */
  envelope: { from: string; to: string[] };
  parsed: ParsedMail;
  /** The message as it came over the wire. */
  raw: string;
  /** Whether the session was encrypted (STARTTLS or implicit TLS) when the mail came. */
  secure: boolean;
  user?: string;
};

export type SmtpReply = { code: number; message: string };

export type SmtpOptions = {
  /** Offer STARTTLS with this key and certificate (otherwise STARTTLS is not offered). */
  tls?: { key: Buffer; cert: Buffer };
  /** TLS from the first byte (smtps://), with `tls`. */
  secure?: boolean;
  /** Require AUTH with these credentials (only over TLS when `tls` is given). */
  auth?: { user: string; pass: string };
  /** Answer RCPT TO with this reply instead of accepting; `attempt` counts from 1 per address. */
  rcpt?: (address: string, attempt: number) => SmtpReply | undefined;
};

export type SmtpServer = {
  port: number;
  host: string;
  mails: ReceivedMail[];
  /** Every RCPT TO the server saw, accepted or not, in order. */
  rcptAttempts: string[];
  waitForMails(count: number, timeoutMs?: number): Promise<ReceivedMail[]>;
  close(): Promise<void>;
};

const servers = new Set<SmtpServer>();

function replyError(r: SmtpReply): Error {
  return Object.assign(new Error(r.message), { responseCode: r.code });
}

export async function startSmtpServer(opts: SmtpOptions = {}): Promise<SmtpServer> {
  const mails: ReceivedMail[] = [];
  const rcptAttempts: string[] = [];
  const attempts = new Map<string, number>();
  const server = new SMTPServer({
    secure: opts.secure ?? false,
    ...(opts.tls ? { key: opts.tls.key, cert: opts.tls.cert } : {}),
    // smtp-server's built-in certificate has expired: without ours, STARTTLS is not offered.
    disabledCommands: opts.tls ? [] : ['STARTTLS'],
    authOptional: !opts.auth,
    allowInsecureAuth: !opts.tls,
    logger: false,
    // Pooled client connections stay open; closing must not wait smtp-server's default 30 s.
    closeTimeout: 500,
    onAuth(auth, _session, callback) {
      if (opts.auth && auth.username === opts.auth.user && auth.password === opts.auth.pass) return callback(null, { user: auth.username });
      callback(replyError({ code: 535, message: '5.7.8 Authentication credentials invalid' }));
    },
    onRcptTo(address: SMTPServerAddress, _session: SMTPServerSession, callback) {
      rcptAttempts.push(address.address);
      const n = (attempts.get(address.address) ?? 0) + 1;
      attempts.set(address.address, n);
      const refusal = opts.rcpt?.(address.address, n);
      callback(refusal ? replyError(refusal) : null);
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const raw = Buffer.concat(chunks);
        simpleParser(raw).then(
          (parsed) => {
            mails.push({
              envelope: {
                from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
                to: session.envelope.rcptTo.map((r) => r.address),
              },
              parsed,
              raw: raw.toString('utf8'),
              secure: session.secure,
              user: session.user as string | undefined,
            });
            callback();
          },
          (err: Error) => callback(err),
        );
      });
    },
  });
  server.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.server.address() as AddressInfo).port;
  const handle: SmtpServer = {
    port,
    host: '127.0.0.1',
    mails,
    rcptAttempts,
    async waitForMails(count, timeoutMs = 5000) {
      await until(`${count} mail(s) at the SMTP server (have ${mails.length})`, () => mails.length >= count, { timeoutMs, intervalMs: 20 });
      return mails;
    },
    close: () =>
      new Promise<void>((resolve) => {
        servers.delete(handle);
        server.close(() => resolve());
      }),
  };
  servers.add(handle);
  return handle;
}

afterAll(async () => {
  await Promise.all([...servers].map((s) => s.close()));
});
