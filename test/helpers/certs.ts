// A throwaway TLS certificate for local peers (an SMTP server's STARTTLS, an HTTPS endpoint),
// made with openssl at run time: nothing secret is committed. Self-signed, for `localhost`
// and 127.0.0.1, valid two days; a client trusts it by taking the certificate as its CA.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './tmp.js';

export type TestCertificate = { key: Buffer; cert: Buffer; keyFile: string; certFile: string };

/**
 * A new key and certificate, or undefined (with the reason printed) when openssl is missing.
 * Under CI=true a missing openssl is an error: the tests that need it must not pass by skipping.
 */
export function testCertificate(commonName = 'localhost'): TestCertificate | undefined {
  const dir = tempDir('push-relay-cert-');
  const keyFile = join(dir, 'key.pem');
  const certFile = join(dir, 'cert.pem');
  try {
    execFileSync(
      'openssl',
      [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
        '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', `/CN=${commonName}`,
        '-addext', `subjectAltName=DNS:${commonName},IP:127.0.0.1`,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 },
    );
  } catch (err) {
    const why = `cannot make a test certificate with openssl: ${(err as Error).message}`;
    if (process.env.CI === 'true') throw new Error(why);
    console.warn(`skipping TLS tests: ${why}`);
    return undefined;
  }
  return { key: readFileSync(keyFile), cert: readFileSync(certFile), keyFile, certFile };
}
