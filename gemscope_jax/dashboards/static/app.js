// gemscope dashboard page: shows what gemscope_jax/dashboards/site.py wrote.
// No framework and no network: data arrive as scripts (data/*.js) that call
// GEMSCOPE.site / .index / .latents, because browsers refuse fetch() of
// file:// URLs. One page, hash routing: #latent=12 shows a latent, anything
// else the index (#sort=max&dir=desc&q=the&dmin=0.1&dmax=5&live=1&p=2).
// The same functions render notebook output (GEMSCOPE.inline, from show.py).
(function () {
  'use strict';
  var G = window.GEMSCOPE = window.GEMSCOPE || {};
  var S = G._store = G._store || {
    site: null, pages: {}, rows: [], latents: {},
    scripts: {}, hay: null, order: null, orderKey: ''
  };
  var ROWS_PER_VIEW = 100;
  var SORTS = ['id', 'density', 'max', 'mean'];

  // Registration, called by the data scripts.
  G.site = function (site) { S.site = site; };
  G.index = function (page, rows) { S.pages[page] = rows; };
  G.latents = function (chunk, records) {
    for (var i = 0; i < records.length; i++) S.latents[records[i].id] = records[i];
  };
  G.missing = function (src) {
    S.missingSite = src;
  };

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (attrs[k] === null || attrs[k] === undefined) continue;
      if (k === 'text') e.textContent = attrs[k];
      else if (k === 'cls') e.className = attrs[k];
      else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, attrs[k]);
    }
    if (children) children.forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    });
    return e;
  }
  var SVGNS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, children) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) {
      if (k === 'text') e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(c); });
    return e;
  }
  // Numbers as every view prints them: 4 significant digits, exponent
  // outside [0.001, 10000).
  function fmt(x) {
    if (x === null || x === undefined || typeof x !== 'number' || isNaN(x)) return '\u2013';
    if (x === 0) return '0';
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return String(Number(x.toPrecision(4)));
  }
  function pct(x) { return (typeof x === 'number' && !isNaN(x)) ? fmt(x * 100) + '%' : '\u2013'; }
  function tok(t) { return String(t).replace(/\u2581/g, ' ').replace(/\n/g, '\u21b5'); }
  function pad(n, digits) { var s = String(n); while (s.length < digits) s = '0' + s; return s; }
  G.fmt = fmt;

  function load(src) {
    if (!S.scripts[src]) {
      S.scripts[src] = new Promise(function (resolve, reject) {
        var s = document.createElement('script');
        s.src = src;
        s.onload = function () { resolve(src); };
        s.onerror = function () { reject(new Error('cannot load ' + src)); };
        document.head.appendChild(s);
      });
    }
    return S.scripts[src];
  }

  function state() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ''));
    var st = {};
    p.forEach(function (v, k) { st[k] = v; });
    return st;
  }
  function hashOf(st) {
    var p = new URLSearchParams();
    Object.keys(st).forEach(function (k) {
      if (st[k] !== '' && st[k] !== null && st[k] !== undefined) p.set(k, st[k]);
    });
    return '#' + p.toString();
  }

  // ----------------------------------------------------------------- header
  function metaLine(meta, stats) {
    var m = meta || {};
    var parts = [];
    if (m.model) parts.push('model ' + m.model);
    if (m.hookpoint) parts.push('hookpoint ' + m.hookpoint);
    if (m.kind) parts.push(m.kind);
    if (m.width) parts.push('width ' + m.width);
    if (m.num_tokens) parts.push(m.num_tokens.toLocaleString('en') + ' tokens scanned' +
      (m.num_windows ? ' (' + m.num_windows.toLocaleString('en') + ' windows of ' + m.seq_len + ')' : ''));
    if (stats && stats.dead !== undefined) parts.push(stats.dead + ' dead of ' + stats.latents);
    return parts.join(' \u00b7 ');
  }
  function renderHeader(header, site, links) {
    header.textContent = '';
    var m = site.meta || {};
    var title = m.title || 'gemscope dashboard';
    document.title = title;
    var h = el('h1', null, [links ? el('a', {href: '#', text: title}) : title]);
    var go = el('form', {cls: 'gs-go', onsubmit: function (ev) {
      ev.preventDefault();
      var v = parseInt(go.querySelector('input').value, 10);
      if (!isNaN(v)) location.hash = '#latent=' + v;
    }}, [el('label', null, ['latent ', el('input', {id: 'gs-go', type: 'number', min: '0', placeholder: 'id'})])]);
    header.appendChild(el('div', {cls: 'gs-top'}, [h, links ? go : null]));
    header.appendChild(el('p', {cls: 'gs-meta', text: metaLine(m, site.stats)}));
  }
  function footer(site) {
    var m = site.meta || {};
    var bits = [];
    if (m.text_source) bits.push('text: ' + m.text_source);
    if (m.k) bits.push(m.k + ' top examples, ' + (m.quantile_bins || 0) + ' quantile bins of ' + (m.per_bin || 0));
    if (m.created) bits.push('written ' + m.created);
    bits.push('gemscope_jax');
    return el('footer', {cls: 'gs-footer', text: bits.join(' \u00b7 ')});
  }

  // ------------------------------------------------------------------ index
  function col(name) { return S.site.layout.columns.indexOf(name); }

  // Index pages load in order; their rows are appended as they arrive.
  function addRows(rows) {
    for (var i = 0; i < rows.length; i++) S.rows.push(rows[i]);
    S.orderKey = '';
  }

  // Lower-case search text per row (top tokens, then the top example),
  // extended as rows arrive.
  function haystack() {
    var t = col('top_tokens'), sn = col('snippet');
    if (!S.hay) S.hay = [];
    for (var i = S.hay.length; i < S.rows.length; i++) {
      var r = S.rows[i];
      S.hay.push((r[t].join(' ') + ' \u0000 ' + r[sn]).toLowerCase());
    }
    return S.hay;
  }

  function sortedOrder(sort, dir) {
    var key = sort + '/' + dir + '/' + S.rows.length;
    if (S.orderKey !== key) {
      var c = col(sort), id = col('id'), rows = S.rows, sign = dir === 'asc' ? 1 : -1;
      var order = rows.map(function (_, i) { return i; });
      order.sort(function (a, b) {
        var x = rows[a][c], y = rows[b][c];
        if (typeof x !== 'number' || isNaN(x)) x = -Infinity;
        if (typeof y !== 'number' || isNaN(y)) y = -Infinity;
        return x !== y ? sign * (x < y ? -1 : 1) : rows[a][id] - rows[b][id];
      });
      S.order = order;
      S.orderKey = key;
    }
    return S.order;
  }

  // The rows the index shows for a state, in order: search, density range
  // (percent), hide dead, then sort.
  function selectRows(st) {
    var sort = SORTS.indexOf(st.sort) >= 0 ? st.sort : 'id';
    var dir = st.dir === 'desc' || st.dir === 'asc' ? st.dir : (sort === 'id' ? 'asc' : 'desc');
    var order = sortedOrder(sort, dir);
    var q = (st.q || '').toLowerCase().trim();
    var dmin = parseFloat(st.dmin), dmax = parseFloat(st.dmax);
    var live = st.live === '1';
    if (!q && isNaN(dmin) && isNaN(dmax) && !live) return order;
    var hay = q ? haystack() : null;
    var dc = col('density'), dead = col('dead'), rows = S.rows;
    return order.filter(function (i) {
      var r = rows[i];
      if (live && r[dead]) return false;
      if (!isNaN(dmin) && !(r[dc] * 100 >= dmin)) return false;
      if (!isNaN(dmax) && !(r[dc] * 100 <= dmax)) return false;
      if (q && hay[i].indexOf(q) < 0) return false;
      return true;
    });
  }

  function setState(patch, push) {
    var st = state();
    delete st.latent;
    Object.keys(patch).forEach(function (k) { st[k] = patch[k]; });
    var h = hashOf(st);
    if (push) location.hash = h;
    else { history.replaceState(null, '', h); route(); }
  }

  function buildIndex(main) {
    main.textContent = '';
    var st = state();
    var search = el('input', {id: 'gs-search', type: 'search', placeholder: 'search top tokens and example text',
      value: st.q || '', oninput: function () { setState({q: search.value, p: ''}); }});
    var sortSel = el('select', {id: 'gs-sort', onchange: function () { setState({sort: sortSel.value, dir: '', p: ''}); }},
      SORTS.map(function (s) { return el('option', {value: s, text: s}); }));
    var dirBtn = el('button', {id: 'gs-dir', type: 'button', onclick: function () {
      var cur = state(); var sort = cur.sort || 'id';
      var d = cur.dir || (sort === 'id' ? 'asc' : 'desc');
      setState({dir: d === 'asc' ? 'desc' : 'asc', p: ''});
    }});
    function num(id, v) {
      var inp = el('input', {id: id, type: 'number', step: 'any', min: '0', max: '100', value: v || '',
        oninput: function () { var o = {p: ''}; o[id.slice(3)] = inp.value; setState(o); }});
      return inp;
    }
    var live = el('input', {id: 'gs-live', type: 'checkbox', onchange: function () {
      setState({live: live.checked ? '1' : '', p: ''});
    }});
    main.appendChild(el('div', {cls: 'gs-controls'}, [
      search,
      el('label', null, ['sort ', sortSel, ' ', dirBtn]),
      el('label', null, ['density ', num('gs-dmin', st.dmin), ' to ', num('gs-dmax', st.dmax), ' %']),
      el('label', null, [live, ' hide dead'])
    ]));
    main.appendChild(el('p', {id: 'gs-status', cls: 'gs-status'}));
    var head = el('tr', null, [['id', 'id'], ['density', 'density'], ['max', 'max'], ['mean', 'mean'],
      ['top tokens', null], ['logit lens', null], ['top example', null]].map(function (h) {
      return el('th', h[1] ? {'data-sort': h[1], cls: 'gs-sortable', onclick: function () {
        var cur = state();
        var same = (cur.sort || 'id') === h[1];
        var d = cur.dir || ((cur.sort || 'id') === 'id' ? 'asc' : 'desc');
        setState({sort: h[1], dir: same ? (d === 'asc' ? 'desc' : 'asc') : '', p: ''});
      }} : null, [h[0]]);
    }));
    main.appendChild(el('table', {id: 'gs-table', cls: 'gs-table'}, [el('thead', null, [head]), el('tbody')]));
    main.appendChild(el('div', {id: 'gs-pager', cls: 'gs-pager'}));
    main.dataset.view = 'index';
  }

  function chipList(items, cls) {
    return el('span', {cls: 'gs-chips'}, items.map(function (t) { return el('span', {cls: cls, text: tok(t)}); }));
  }

  function renderIndex(main, links) {
    if (main.dataset.view !== 'index') buildIndex(main);
    var st = state();
    var sort = SORTS.indexOf(st.sort) >= 0 ? st.sort : 'id';
    var dir = st.dir === 'desc' || st.dir === 'asc' ? st.dir : (sort === 'id' ? 'asc' : 'desc');
    // Controls follow the hash (back button, a pasted link).
    var fields = {'gs-search': st.q || '', 'gs-dmin': st.dmin || '', 'gs-dmax': st.dmax || ''};
    Object.keys(fields).forEach(function (id) {
      var inp = document.getElementById(id);
      if (inp && document.activeElement !== inp && inp.value !== fields[id]) inp.value = fields[id];
    });
    document.getElementById('gs-sort').value = sort;
    document.getElementById('gs-dir').textContent = dir === 'asc' ? '\u2191 ascending' : '\u2193 descending';
    document.getElementById('gs-live').checked = st.live === '1';
    main.querySelectorAll('th[data-sort]').forEach(function (th) {
      th.className = 'gs-sortable' + (th.dataset.sort === sort ? ' gs-sorted-' + dir : '');
    });

    var sel = selectRows(st);
    var pages = Math.max(1, Math.ceil(sel.length / ROWS_PER_VIEW));
    var p = Math.min(Math.max(0, parseInt(st.p, 10) || 0), pages - 1);
    var c = {};
    S.site.layout.columns.forEach(function (n, i) { c[n] = i; });
    var body = main.querySelector('#gs-table tbody');
    var frag = document.createDocumentFragment();
    sel.slice(p * ROWS_PER_VIEW, (p + 1) * ROWS_PER_VIEW).forEach(function (i) {
      var r = S.rows[i];
      var id = r[c.id];
      var idCell = links ? el('a', {href: '#latent=' + id, text: String(id)}) : String(id);
      frag.appendChild(el('tr', {'data-id': String(id), cls: r[c.dead] ? 'gs-dead' : null}, [
        el('td', {cls: 'gs-num'}, [idCell, r[c.dead] ? el('span', {cls: 'gs-tag', text: 'dead'}) : null]),
        el('td', {cls: 'gs-num', title: (r[c.count] || 0) + ' tokens', text: pct(r[c.density])}),
        el('td', {cls: 'gs-num gs-max', text: fmt(r[c.max])}),
        el('td', {cls: 'gs-num', text: fmt(r[c.mean])}),
        el('td', null, [chipList(r[c.top_tokens], 'gs-chip')]),
        el('td', null, [chipList(r[c.lens], 'gs-chip gs-lens')]),
        el('td', {cls: 'gs-snippet', text: r[c.snippet]})
      ]));
    });
    body.textContent = '';
    body.appendChild(frag);
    // Milliseconds from navigation to the first rows (tests read it).
    if (!G.firstRowsMs && sel.length) G.firstRowsMs = performance.now();

    var total = S.site.stats.latents;
    var status = sel.length.toLocaleString('en') + ' of ' + S.rows.length.toLocaleString('en') + ' latents';
    if (S.rows.length < total) status += ' (' + total.toLocaleString('en') + ' in all; loading the rest\u2026)';
    var st2 = document.getElementById('gs-status');
    st2.textContent = status;
    st2.dataset.loaded = S.rows.length === total ? 'all' : 'some';
    st2.dataset.count = String(sel.length);

    var pager = document.getElementById('gs-pager');
    pager.textContent = '';
    var first = sel.length ? p * ROWS_PER_VIEW + 1 : 0;
    pager.appendChild(el('button', {type: 'button', id: 'gs-prev', disabled: p === 0 ? '' : null,
      onclick: function () { setState({p: String(p - 1)}); }}, ['\u2190 previous']));
    pager.appendChild(el('span', {text: ' rows ' + first + '\u2013' + Math.min(sel.length, (p + 1) * ROWS_PER_VIEW) +
      ' of ' + sel.length.toLocaleString('en') + ' '}));
    pager.appendChild(el('button', {type: 'button', id: 'gs-next', disabled: p >= pages - 1 ? '' : null,
      onclick: function () { setState({p: String(p + 1)}); }}, ['next \u2192']));
  }

  // Index pages: the first one renders the first view; the rest load one
  // after another behind it (yielding between pages, so the page stays
  // responsive), the view redrawn at most every 500 ms and at the end.
  function loadIndexPages(onMore) {
    var layout = S.site.layout;
    var next = 0, lastDraw = 0;
    function src(p) { return 'data/index/' + pad(p, layout.page_digits) + '.js'; }
    function step() {
      var p = next++;
      load(src(p)).then(function () {
        addRows(S.pages[p]);
        delete S.pages[p];
        var now = Date.now(), last = next >= layout.pages;
        if (p === 0 || last || now - lastDraw > 500) {
          onMore(last);
          lastDraw = Date.now();
        }
        if (!last) setTimeout(step, 0);
      }, function (err) { showError(err.message); });
    }
    if (layout.pages > 0) step(); else onMore(true);
  }

  // ----------------------------------------------------------------- charts
  // Bins drawn equally wide whatever their edges (the scan's are 0, then
  // log-spaced up to the max), the edges written under them.
  function histogram(h, title) {
    var W = 420, H = 140, L = 40, R = 8, B = 30, T = 6;
    var edges = (h && h.edges) || [], counts = (h && h.counts) || [];
    var box = el('figure', {cls: 'gs-chart'});
    box.appendChild(el('figcaption', {text: title}));
    if (!counts.length) { box.appendChild(el('p', {cls: 'gs-note', text: 'no activations'})); return box; }
    var n = counts.length, slot = (W - L - R) / n;
    var top = Math.max.apply(null, counts) || 1;
    var g = svg('svg', {viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, 'class': 'gs-hist', role: 'img'});
    counts.forEach(function (c, i) {
      var bh = c / top * (H - B - T);
      var r = svg('rect', {x: L + i * slot, y: H - B - bh, width: Math.max(0.5, slot - 1), height: bh, 'class': 'gs-bar'});
      r.appendChild(svg('title', {text: fmt(edges[i]) + ' to ' + fmt(edges[i + 1]) + ': ' + c + ' tokens'}));
      g.appendChild(r);
    });
    g.appendChild(svg('line', {x1: L, y1: H - B, x2: W - R, y2: H - B, 'class': 'gs-axis'}));
    var ticks = n >= 8 ? [0, Math.round(n / 4), Math.round(n / 2), Math.round(3 * n / 4), n] : [0, n];
    ticks.forEach(function (i, j) {
      var anchor = j === 0 ? 'start' : (j === ticks.length - 1 ? 'end' : 'middle');
      g.appendChild(svg('line', {x1: L + i * slot, y1: H - B, x2: L + i * slot, y2: H - B + 4, 'class': 'gs-axis'}));
      g.appendChild(svg('text', {x: L + i * slot, y: H - B + 15, 'text-anchor': anchor, text: fmt(edges[i])}));
    });
    g.appendChild(svg('text', {x: L - 4, y: T + 8, 'text-anchor': 'end', text: String(top)}));
    g.appendChild(svg('text', {x: L - 4, y: H - B, 'text-anchor': 'end', text: '0'}));
    box.appendChild(g);
    return box;
  }

  function lensChart(pairs, title, cls) {
    var W = 300, row = 17, L = 120;
    pairs = pairs || [];
    var box = el('figure', {cls: 'gs-chart'});
    box.appendChild(el('figcaption', {text: title}));
    if (!pairs.length) { box.appendChild(el('p', {cls: 'gs-note', text: 'none'})); return box; }
    var top = Math.max.apply(null, pairs.map(function (p) { return Math.abs(p[1]); })) || 1;
    var H = row * pairs.length + 4;
    var g = svg('svg', {viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, 'class': 'gs-lens-chart ' + cls, role: 'img'});
    pairs.forEach(function (p, i) {
      var y = 2 + i * row, w = Math.abs(p[1]) / top * (W - L - 50);
      g.appendChild(svg('text', {x: L - 6, y: y + 12, 'text-anchor': 'end', 'class': 'gs-lens-token', text: tok(p[0])}));
      g.appendChild(svg('rect', {x: L, y: y + 2, width: Math.max(1, w), height: row - 5, 'class': 'gs-bar'}));
      g.appendChild(svg('text', {x: L + w + 4, y: y + 12, text: fmt(p[1])}));
    });
    box.appendChild(g);
    return box;
  }

  // -------------------------------------------------------------- contexts
  function context(ex, max) {
    var acts = ex.acts || [], toks = ex.tokens || [];
    var line = el('div', {cls: 'gs-context'});
    line.appendChild(el('span', {cls: 'gs-value', title: 'activation at the peak token', text: fmt(ex.value)}));
    var text = el('span', {cls: 'gs-tokens'});
    toks.forEach(function (t, i) {
      var a = acts[i] || 0, rel = max > 0 ? Math.max(0, Math.min(1, a / max)) : 0;
      var s = el('span', {cls: 'gs-tok' + (i === ex.peak ? ' gs-peak' : ''), title: JSON.stringify(String(t)) + ': ' + fmt(a),
        text: tok(t)});
      if (rel > 0) s.style.backgroundColor = 'rgba(255, 120, 0, ' + (0.08 + 0.82 * rel).toFixed(3) + ')';
      text.appendChild(s);
    });
    line.appendChild(text);
    return line;
  }

  function neighbourList(pairs, title, links) {
    if (!pairs || !pairs.length) return null;
    return el('section', {cls: 'gs-neighbours'}, [el('h3', {text: title}), el('p', null, pairs.map(function (p) {
      var label = String(p[0]);
      return el('span', {cls: 'gs-neighbour'}, [links ? el('a', {href: '#latent=' + p[0], text: label}) : label,
        el('small', {text: ' ' + fmt(p[1])})]);
    }))]);
  }

  function renderLatent(main, site, rec, id, links) {
    main.textContent = '';
    main.dataset.view = 'latent';
    var nav = links ? el('p', {cls: 'gs-nav'}, [el('a', {href: '#', id: 'gs-back', text: '\u2190 all latents'}), ' \u00b7 ',
      id > 0 ? el('a', {href: '#latent=' + (id - 1), text: 'latent ' + (id - 1)}) : null, id > 0 ? ' \u00b7 ' : null,
      el('a', {href: '#latent=' + (id + 1), text: 'latent ' + (id + 1)})]) : null;
    if (nav) main.appendChild(nav);
    if (!rec) {
      main.appendChild(el('h2', {text: 'Latent ' + id}));
      main.appendChild(el('p', {cls: 'gs-note gs-missing', text: 'This site has no record of latent ' + id + '.'}));
      return;
    }
    var m = site.meta || {};
    main.appendChild(el('h2', {id: 'gs-latent-title', text: 'Latent ' + rec.id}));
    if (rec.dead) {
      main.appendChild(el('p', {id: 'gs-dead', cls: 'gs-banner', text: 'Dead latent: it never fired on the ' +
        (m.num_tokens ? m.num_tokens.toLocaleString('en') + ' ' : '') + 'tokens scanned.'}));
    }
    main.appendChild(el('dl', {cls: 'gs-stats'}, [
      el('dt', {text: 'max'}), el('dd', {id: 'gs-stat-max', text: fmt(rec.max)}),
      el('dt', {text: 'mean (when firing)'}), el('dd', {id: 'gs-stat-mean', text: fmt(rec.mean)}),
      el('dt', {text: 'density'}), el('dd', {id: 'gs-stat-density', text: pct(rec.density) + ' (' + (rec.count || 0).toLocaleString('en') + ' tokens)'}),
      el('dt', {text: 'top tokens'}), el('dd', null, [chipList(rec.top_tokens || [], 'gs-chip')])
    ]));
    var charts = el('div', {cls: 'gs-charts'});
    charts.appendChild(histogram(rec.histogram, 'Activations when firing (fires on ' + pct(rec.density) + ' of tokens)'));
    var lens = rec.logit_lens || {};
    charts.appendChild(lensChart(lens.top, 'Logit lens: promoted tokens', 'gs-pos'));
    charts.appendChild(lensChart(lens.bottom, 'Logit lens: suppressed tokens', 'gs-neg'));
    main.appendChild(charts);
    if (m.lens) main.appendChild(el('p', {cls: 'gs-note', text: 'Logit lens: ' + m.lens}));
    // An SAE has no input-side neighbours (the list is absent or empty).
    [neighbourList(rec.neighbours, 'Neighbours', links),
     neighbourList(rec.input_neighbours, 'Input neighbours', links)].forEach(function (s) {
      if (s) main.appendChild(s);
    });
    var top = rec.top || [];
    if (top.length) {
      var sec = el('section', {id: 'gs-top', cls: 'gs-examples'}, [el('h3', {text: 'Top activations'})]);
      top.forEach(function (ex) { sec.appendChild(context(ex, rec.max)); });
      main.appendChild(sec);
    } else if (!rec.dead) {
      main.appendChild(el('p', {cls: 'gs-note', text: 'No examples recorded.'}));
    }
    (rec.quantiles || []).forEach(function (q, i) {
      if (!q.examples || !q.examples.length) return;
      var sec = el('section', {cls: 'gs-examples gs-quantile'}, [el('h3', {text: 'Interval ' + fmt(q.lo) + ' to ' + fmt(q.hi) +
        ' (' + (q.count || 0).toLocaleString('en') + ' tokens)'})]);
      q.examples.forEach(function (ex) { sec.appendChild(context(ex, rec.max)); });
      main.appendChild(sec);
    });
  }

  // Whether the site wrote data/latents/<chunk>.js (asking for a missing
  // file would log an error).
  function hasChunk(chunk) {
    var runs = S.site.layout.chunks || [];
    for (var i = 0; i < runs.length; i++) if (chunk >= runs[i][0] && chunk <= runs[i][1]) return true;
    return false;
  }

  // ----------------------------------------------------------------- router
  var H = null, M = null, indexLoading = false;
  function showError(msg) {
    if (!M) return;
    M.appendChild(el('p', {cls: 'gs-banner', text: msg}));
  }

  function route() {
    var st = state();
    if (st.latent !== undefined && st.latent !== '') {
      var id = parseInt(st.latent, 10);
      M.dataset.view = 'loading';
      var layout = S.site.layout;
      var src = 'data/latents/' + pad(Math.floor(id / layout.per_file), layout.file_digits) + '.js';
      var done = function () {
        if (String(state().latent) !== String(st.latent)) return;  // moved on
        renderLatent(M, S.site, S.latents[id], id, true);
        window.scrollTo(0, 0);
      };
      if (isNaN(id) || id < 0 || !hasChunk(Math.floor(id / layout.per_file))) {
        renderLatent(M, S.site, null, isNaN(id) ? st.latent : id, true);
        return;
      }
      if (S.latents[id]) done(); else load(src).then(done, done);
      return;
    }
    if (!indexLoading) {
      indexLoading = true;
      loadIndexPages(function () { if (M.dataset.view === 'index' || M.dataset.view === 'wait') renderIndex(M, true); });
      M.dataset.view = 'wait';
      return;
    }
    if (S.rows.length || S.pages[0]) renderIndex(M, true);
  }

  G.start = function (header, main) {
    H = header; M = main;
    if (!S.site) {
      main.textContent = '';
      main.appendChild(el('p', {cls: 'gs-banner', text: 'No data: data/site.js is missing or broken. ' +
        'Write the site with gemscope_jax.dashboards.write_site and open its index.html.'}));
      return;
    }
    renderHeader(header, S.site, true);
    main.parentNode.appendChild(footer(S.site));
    window.addEventListener('hashchange', route);
    route();
  };

  // Notebook output (show.py): one latent, or an index without links.
  G.inline = function (root, site, what) {
    root.textContent = '';
    var header = el('header'), main = el('main');
    root.appendChild(header); root.appendChild(main);
    renderHeader(header, site, false);
    if (what.record !== undefined) {
      renderLatent(main, site, what.record, what.record ? what.record.id : what.id, false);
    } else {
      main.appendChild(inlineIndex(site, what.rows || []));
    }
    root.appendChild(footer(site));
  };

  // A plain table of index rows (notebook output: no hash, no links).
  function inlineIndex(site, rows) {
    var table = el('table', {cls: 'gs-table'});
    var c = {};
    site.layout.columns.forEach(function (n, i) { c[n] = i; });
    table.appendChild(el('thead', null, [el('tr', null, ['id', 'density', 'max', 'mean', 'top tokens', 'logit lens', 'top example']
      .map(function (h) { return el('th', {text: h}); }))]));
    var body = el('tbody');
    rows.forEach(function (r) {
      body.appendChild(el('tr', {'data-id': String(r[c.id]), cls: r[c.dead] ? 'gs-dead' : null}, [
        el('td', {cls: 'gs-num'}, [String(r[c.id]), r[c.dead] ? el('span', {cls: 'gs-tag', text: 'dead'}) : null]),
        el('td', {cls: 'gs-num', text: pct(r[c.density])}),
        el('td', {cls: 'gs-num gs-max', text: fmt(r[c.max])}),
        el('td', {cls: 'gs-num', text: fmt(r[c.mean])}),
        el('td', null, [chipList(r[c.top_tokens], 'gs-chip')]),
        el('td', null, [chipList(r[c.lens], 'gs-chip gs-lens')]),
        el('td', {cls: 'gs-snippet', text: r[c.snippet]})]));
    });
    table.appendChild(body);
    return table;
  }
})();
