// The pairing page: subscribes this browser to Web Push with the relay's VAPID key and asks the
// relay to sign it in to Mattermost, which then pushes to it. Plain script, no build step, no
// inline code (the page's Content-Security-Policy forbids it); text goes in with textContent only.
//
// The browser keeps one thing: its device token (localStorage), the capability to see, test,
// change and unpair its own pairing. The password leaves the form once, for the relay to pass to
// Mattermost; the Mattermost session token never reaches the page.
'use strict';

(() => {
  const DEVICE_KEY = 'push-relay.device';
  const $ = (id) => document.getElementById(id);
  let config = null;
  let registration = null;

  // ---- messages ----

  function say(text) {
    $('problem').hidden = true;
    $('status').textContent = text || '';
  }
  function problem(text) {
    $('status').textContent = '';
    const p = $('problem');
    p.textContent = text;
    p.hidden = !text;
  }

  async function api(path, body) {
    let res;
    try {
      res = await fetch(path, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
        credentials: 'same-origin',
        cache: 'no-store',
      });
    } catch (err) {
      return { ok: false, error: 'network', message: 'The relay cannot be reached. Check your connection and try again.' };
    }
    try {
      return await res.json();
    } catch (_) {
      return { ok: false, error: 'bad_answer', message: `The relay answered HTTP ${res.status} without an explanation.` };
    }
  }

  const busy = (button, on) => {
    button.disabled = on;
    button.setAttribute('aria-busy', String(on));
  };

  // ---- what this browser can do ----

  const isIOS = () => /iPad|iPhone|iPod/.test(navigator.userAgent) || (navigator.platform === 'MacIntel' && navigator.maxTouchPoints > 1);
  const isStandalone = () => navigator.standalone === true || window.matchMedia('(display-mode: standalone)').matches;

  function guessLabel() {
    const ua = navigator.userAgent;
    const browser = /Edg\//.test(ua) ? 'Edge' : /Firefox\//.test(ua) ? 'Firefox' : /Chrom(e|ium)\//.test(ua) ? 'Chrome' : /Safari\//.test(ua) ? 'Safari' : 'Browser';
    const os = /Android/.test(ua) ? 'Android' : isIOS() ? 'iOS' : /Mac OS X/.test(ua) ? 'macOS' : /Windows/.test(ua) ? 'Windows' : /Linux/.test(ua) ? 'Linux' : '';
    return os ? `${browser} on ${os}` : browser;
  }

  function urlBase64ToUint8Array(base64url) {
    const padded = base64url.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (base64url.length % 4)) % 4);
    const raw = atob(padded);
    return Uint8Array.from(raw, (c) => c.charCodeAt(0));
  }

  /** The push subscription for the relay's key: the existing one when it is for that key, else a new one. */
  async function subscribe() {
    const key = urlBase64ToUint8Array(config.vapidPublicKey);
    const existing = await registration.pushManager.getSubscription();
    if (existing) {
      const had = existing.options && existing.options.applicationServerKey;
      const same = had && new Uint8Array(had).join(',') === key.join(',');
      if (same) return existing;
      await existing.unsubscribe();
    }
    return registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
  }

  async function askPermission() {
    if (Notification.permission === 'granted') return true;
    if (Notification.permission === 'denied') {
      problem('Notifications are blocked for this site. Allow them in the browser\'s site settings, then try again.');
      return false;
    }
    const answer = await Notification.requestPermission();
    if (answer !== 'granted') {
      problem('Notifications were not allowed, so this browser cannot be paired. Allow them when the browser asks.');
      return false;
    }
    return true;
  }

  // ---- views ----

  function showPairForm() {
    $('paired').hidden = true;
    $('pair').hidden = false;
  }

  function showPaired(status) {
    $('pair').hidden = true;
    $('paired').hidden = false;
    const who = status.account ? `@${status.account.username}` : 'an account';
    $('paired-as').textContent = `Signed in to ${config.mattermost.host || 'Mattermost'} as ${who}. This browser: ${status.label}.`;
    $('expired').hidden = !status.sessionExpired;
    $('repair-button').hidden = !status.sessionExpired;
    const email = status.account && status.account.email;
    $('email-field').hidden = !email;
    if (email) {
      $('email-address').textContent = email;
      $('email').checked = status.email;
    }
    $('ntfy').value = status.ntfy || '';
  }

  // ---- actions ----

  async function pair(path, fields, button) {
    problem('');
    busy(button, true);
    try {
      if (!(await askPermission())) return null;
      say('Subscribing this browser to notifications…');
      let subscription;
      try {
        subscription = await subscribe();
      } catch (err) {
        problem(`This browser could not subscribe to push notifications (${err && err.message ? err.message : err}).`);
        return null;
      }
      say('Signing in to Mattermost…');
      const previous = localStorage.getItem(DEVICE_KEY) || undefined;
      const label = $('label').value.trim() || guessLabel();
      const answer = await api(path, { ...fields, label, subscription: subscription.toJSON(), previous });
      if (answer.ok) {
        localStorage.setItem(DEVICE_KEY, answer.device);
        say('Paired. Mattermost now sends your notifications to this browser.');
        showPaired(answer.status);
        $('paired-title').focus();
      }
      return answer;
    } finally {
      busy(button, false);
    }
  }

  async function onLogin(event) {
    event.preventDefault();
    const loginId = $('login-id').value.trim();
    const password = $('password').value;
    if (!loginId) return problem('Enter your Mattermost email or username.'), $('login-id').focus();
    if (!password) return problem('Enter your password.'), $('password').focus();
    const fields = { loginId, password };
    const mfa = $('mfa').value.trim();
    if (!$('mfa-field').hidden && mfa) fields.mfaToken = mfa;
    const answer = await pair('/pair/login', fields, $('login-button'));
    if (!answer) return;
    if (answer.ok) {
      $('password').value = '';
      $('mfa').value = '';
      $('mfa-field').hidden = true;
      return;
    }
    if (answer.error === 'mfa_required' || answer.error === 'mfa_invalid') {
      $('mfa-field').hidden = false;
      $('mfa').value = '';
      $('mfa').required = true;
      if (answer.error === 'mfa_required') say(answer.message);
      else problem(answer.message);
      $('mfa').focus();
      return;
    }
    problem(answer.message || 'Pairing failed.');
    if (answer.error === 'invalid_credentials') {
      $('password').value = '';
      $('password').focus();
    }
  }

  async function onToken(event) {
    event.preventDefault();
    const accessToken = $('access-token').value.trim();
    if (!accessToken) return problem('Paste a personal access token.'), $('access-token').focus();
    const answer = await pair('/pair/token', { accessToken }, $('token-button'));
    if (!answer) return;
    if (answer.ok) {
      $('access-token').value = '';
      return;
    }
    problem(answer.message || 'Pairing failed.');
    $('access-token').focus();
  }

  async function onTest() {
    const button = $('test-button');
    busy(button, true);
    try {
      const answer = await api('/pair/test', { device: localStorage.getItem(DEVICE_KEY) });
      if (answer.ok) say(answer.message);
      else await handleDeviceError(answer);
    } finally {
      busy(button, false);
    }
  }

  async function saveSettings(change) {
    const answer = await api('/pair/settings', { device: localStorage.getItem(DEVICE_KEY), ...change });
    if (answer.ok) {
      showPaired(answer.status);
      return true;
    }
    await handleDeviceError(answer);
    return false;
  }

  async function onEmail() {
    const on = $('email').checked;
    if (await saveSettings({ email: on })) say(on ? 'Notifications are also emailed to you.' : 'No more emails.');
    else $('email').checked = !on;
  }

  async function onNtfy(event) {
    event.preventDefault();
    const value = $('ntfy').value.trim();
    const button = $('ntfy-button');
    busy(button, true);
    try {
      if (await saveSettings({ ntfy: value || null })) say(value ? 'Notifications also go to your ntfy topic.' : 'ntfy topic removed.');
      else $('ntfy').focus();
    } finally {
      busy(button, false);
    }
  }

  async function onUnpair() {
    const button = $('unpair-button');
    busy(button, true);
    try {
      const answer = await api('/pair/unpair', { device: localStorage.getItem(DEVICE_KEY) });
      if (!answer.ok && answer.error !== 'not_paired') return problem(answer.message);
      localStorage.removeItem(DEVICE_KEY);
      const sub = registration && (await registration.pushManager.getSubscription().catch(() => null));
      if (sub) await sub.unsubscribe().catch(() => {});
      showPairForm();
      say(answer.ok ? answer.message : 'This browser was not paired any more.');
      $('pair-title').focus();
    } finally {
      busy(button, false);
    }
  }

  async function handleDeviceError(answer) {
    if (answer.error === 'not_paired') {
      localStorage.removeItem(DEVICE_KEY);
      showPairForm();
    }
    problem(answer.message || 'Something went wrong.');
  }

  // ---- start ----

  async function start() {
    $('label').placeholder = guessLabel();
    $('paired-title').tabIndex = -1;
    $('pair-title').tabIndex = -1;
    $('login-form').addEventListener('submit', onLogin);
    $('token-form').addEventListener('submit', onToken);
    $('test-button').addEventListener('click', onTest);
    $('repair-button').addEventListener('click', () => {
      showPairForm();
      $('login-id').focus();
    });
    $('email').addEventListener('change', onEmail);
    $('ntfy-form').addEventListener('submit', onNtfy);
    $('unpair-button').addEventListener('click', onUnpair);

    try {
      const res = await fetch('/pair/config', { cache: 'no-store' });
      config = await res.json();
    } catch (_) {
      return problem('The relay cannot be reached. Reload the page to try again.');
    }
    if (config.mattermost.host) $('host').textContent = config.mattermost.host;

    if (!window.isSecureContext || !config.secure) {
      return problem('This page must be opened over https://: the administrator needs to put the relay behind TLS (a reverse proxy with a certificate).');
    }
    if (isIOS() && !isStandalone()) {
      $('ios-install').hidden = false;
      return;
    }
    if (!('serviceWorker' in navigator) || !('PushManager' in window) || !('Notification' in window)) {
      $('unsupported').hidden = false;
      return;
    }
    if (!config.mattermost.configured) {
      return problem("This relay does not know its Mattermost server yet: the administrator must set mattermost.url in the relay's configuration.");
    }
    if (!config.vapidPublicKey) {
      return problem("This relay has no Web Push sink configured yet: the administrator must add one (push-relay vapid generate).");
    }

    try {
      await navigator.serviceWorker.register('/sw.js', { scope: '/' });
      registration = await navigator.serviceWorker.ready;
    } catch (err) {
      return problem(`The notification worker could not be installed (${err && err.message ? err.message : err}).`);
    }

    const device = localStorage.getItem(DEVICE_KEY);
    if (device) {
      const answer = await api('/pair/status', { device });
      if (answer.ok) {
        showPaired(answer.status);
        document.body.dataset.ready = 'paired';
        return;
      }
      if (answer.error === 'not_paired') localStorage.removeItem(DEVICE_KEY);
      else problem(answer.message);
    }
    showPairForm();
    document.body.dataset.ready = 'form';
  }

  start().catch((err) => problem(`Unexpected error: ${err && err.message ? err.message : err}`));
})();
