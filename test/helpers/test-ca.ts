// A throwaway TLS certificate for local HTTPS peers, made at run time with openssl (node:crypto
// can make keys but not X.509 certificates): self-signed, for 127.0.0.1 and localhost, valid
// two days. A relay child trusts it through NODE_EXTRA_CA_CERTS=<certFile>, as any Node
// program trusts an extra CA (interface.md), so the relay needs no test-only setting.
//
// Peer policy as for mosquitto: without openssl the tests skip locally with the reason
// printed, and fail under CI=true.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './tmp.js';

export type TestCertificate = { key: string; cert: string; certFile: string };

export function haveOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore', timeout: 5000 });
    return true;
  } catch (err) {
    if (process.env.CI === 'true') return true;
    console.warn(`SKIPPED: openssl not runnable (${(err as Error).message}); under CI=true these tests fail instead.`);
    return false;
  }
}

export function makeTestCertificate(): TestCertificate {
  const dir = tempDir('push-relay-tls-');
  const keyFile = join(dir, 'key.pem');
  const certFile = join(dir, 'cert.pem');
  execFileSync(
    'openssl',
    [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=push-relay test peer',
      '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    ],
    { stdio: 'pipe', timeout: 10_000 },
  );
  return { key: readFileSync(keyFile, 'utf8'), cert: readFileSync(certFile, 'utf8'), certFile };
}
