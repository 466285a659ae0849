// Test certificates made at run time (never committed): a self-signed P-256 certificate for
// localhost and 127.0.0.1 from the machine's openssl, and an HTTP(S) client that trusts it and
// reports the certificate the server presented.
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { TLSSocket } from 'node:tls';
import { join } from 'node:path';
import { tempDir } from './tmp.js';

export type TestCert = { cert: string; key: string; pem: Buffer; fingerprint: string };

let n = 0;

/** Writes cert.pem and key.pem (into `dir`, default a fresh temp dir) for `cn`, valid one day. */
export function makeCert(cn = 'localhost', dir = tempDir('push-relay-tls-')): TestCert {
  const id = ++n;
  const cert = join(dir, `cert-${id}.pem`);
  const key = join(dir, `key-${id}.pem`);
  execFileSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert,
      '-days', '1', '-subj', `/CN=${cn}`, '-addext', `subjectAltName=DNS:${cn},IP:127.0.0.1`],
    { stdio: 'ignore' },
  );
  const pem = readFileSync(cert);
  return { cert, key, pem, fingerprint: new X509Certificate(pem).fingerprint256 };
}

export type TlsReply = { status: number; headers: Record<string, string | string[] | undefined>; text: string; json: unknown; fingerprint?: string };

/**
 * One request on a fresh connection, over http or https (trusting `ca`), the way Mattermost
 * posts (no Content-Type, User-Agent Mattermost-Bot/1.1). `fingerprint`: the certificate the
 * server presented on this connection.
 */
export function call(
  url: string,
  { method = 'POST', body, headers = {}, ca }: { method?: string; body?: string; headers?: Record<string, string>; ca?: Buffer } = {},
): Promise<TlsReply> {
  const https = url.startsWith('https:');
  const all: Record<string, string> = { 'User-Agent': 'Mattermost-Bot/1.1', ...headers };
  if (body !== undefined) all['Content-Length'] = String(Buffer.byteLength(body));
  return new Promise((resolve, reject) => {
    const options = { method, headers: all, agent: false as const, ...(https ? { ca, servername: 'localhost' } : {}) };
    const req = (https ? httpsRequest : httpRequest)(url, options, (res) => {
      const fp = https ? (res.socket as TLSSocket).getPeerCertificate()?.fingerprint256 : undefined;
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json, fingerprint: fp });
      });
    });
    req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${url}: no reply within 10 s`)));
    req.on('error', reject);
    req.end(body);
  });
}
