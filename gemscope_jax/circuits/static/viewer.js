// gemscope circuit viewer: draws what gemscope_jax/circuits/viewer.py put in
// the page (GEMSCOPE_CIRCUIT.graph, circuit-tracer's graph JSON, and
// GEMSCOPE_CIRCUIT.view, the layout computed in Python). No framework, no
// network. Nodes sit by layer (rows, embeddings at the bottom, logits at
// the top) and prompt position (columns); edges are SVG paths, blue for
// positive weights and red for negative, wider for larger |weight|.
// Hover shows details, a click pins a node and lists its edges, pinned
// nodes group into a supernode (edges summed), a slider hides weak edges.
(function () {
  'use strict';
  var G = window.GEMSCOPE_CIRCUIT = window.GEMSCOPE_CIRCUIT || {};
  var SLOT = 16, LINE = 20, ROW_PAD = 10, COL_PAD = 14;
  var LEFT = 52, RIGHT = 16, TOP = 118, BOTTOM = 34;
  var SVGNS = 'http://www.w3.org/2000/svg';

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      var v = attrs[k];
      if (v === null || v === undefined) continue;
      if (k === 'text') e.textContent = v;
      else if (k === 'cls') e.className = v;
      else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    });
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) {
      if (k === 'text') e.textContent = attrs[k];
      else if (k === 'cls') e.setAttribute('class', attrs[k]);
      else e.setAttribute(k, attrs[k]);
    }
    return e;
  }
  // Numbers as the dashboards print them: 4 significant digits, exponent
  // outside [0.001, 10000).
  function fmt(x) {
    if (x === null || x === undefined || typeof x !== 'number' || isNaN(x)) return '\u2013';
    if (x === 0) return '0';
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return String(Number(x.toPrecision(4)));
  }
  G.fmt = fmt;
  function cut(text, n) { text = String(text); return text.length > n ? text.slice(0, n - 1) + '\u2026' : text; }
  function tok(t) { return String(t).replace(/\u2581/g, ' ').replace(/\n/g, '\u21b5'); }

  // ------------------------------------------------------------------ model
  function Model(graph, view) {
    var m = this;
    m.graph = graph; m.view = view;
    m.nodes = graph.nodes;
    m.tokens = (graph.metadata || {}).prompt_tokens || [];
    m.index = new Map();
    m.nodes.forEach(function (n, i) { m.index.set(String(n.node_id), i); });
    m.links = graph.links.map(function (l) {
      return {s: m.index.get(String(l.source)), t: m.index.get(String(l.target)), w: l.weight};
    });
    m.abs = m.links.map(function (l) { return Math.abs(l.w); }).sort(function (a, b) { return a - b; });
    m.groupOf = new Array(m.nodes.length).fill(null);
    m.groups = new Map();
    m.nextGroup = 1;
  }

  // Pixel positions, spread to fill a `width` x `height` view when the
  // graph is small (slots up to 3x wider, lines up to 2.5x taller) and
  // squeezed a little when it is wide (slots down to 0.85x).
  Model.prototype.geometry = function (width, height) {
    var v = this.view, m = this;
    var slots = v.columns.reduce(function (a, c) { return a + c.slots; }, 0);
    var lines = v.rows.reduce(function (a, r) { return a + r.lines; }, 0);
    var logits = v.kinds.indexOf('logit') >= 0;
    this.top = logits ? TOP : 24;
    var right = logits ? RIGHT + 70 : RIGHT;  // room for slanted logit labels
    var clamp = function (x, lo, hi) { return Math.max(lo, Math.min(hi, x)); };
    var sx = clamp((width - LEFT - right - (v.columns.length - 1) * COL_PAD) / (slots * SLOT), 0.85, 3);
    // Rows shrink down to 13 px a line (nodes are 11-13 px) before the graph
    // scrolls vertically: a tall graph of all 18 layers still fits a window.
    var sy = clamp((height - this.top - BOTTOM - (v.rows.length - 1) * ROW_PAD) / (lines * LINE), 0.65, 2.5);
    this.slot = SLOT * sx; this.line = LINE * sy;
    var x = LEFT, y = 0;
    this.colX = v.columns.map(function (c) {
      var at = x; x += c.slots * m.slot + COL_PAD; return at;
    });
    this.width = Math.floor(x - COL_PAD + right);
    this.rowY = v.rows.map(function (r) { var at = y; y += r.lines * m.line + ROW_PAD; return at; });
    this.height = Math.floor(this.top + y - ROW_PAD + BOTTOM);
    // Centre each line of a cell in its column.
    var count = new Map();
    v.place.forEach(function (p) {
      var k = p[0] + ',' + p[1] + ',' + p[3];
      count.set(k, (count.get(k) || 0) + 1);
    });
    this.xy = v.place.map(function (p) {
      var n = count.get(p[0] + ',' + p[1] + ',' + p[3]);
      var x0 = m.colX[p[0]] + (v.columns[p[0]].slots - n) * m.slot / 2;
      return [x0 + (p[2] + 0.5) * m.slot, m.bottomY(p[1], p[3])];
    });
  };
  Model.prototype.bottomY = function (row, line) {
    return this.height - BOTTOM - (this.rowY[row] + (line + 0.5) * this.line);
  };
  // What a node is drawn as: itself, or the supernode it is grouped into.
  Model.prototype.key = function (i) {
    return this.groupOf[i] || String(this.nodes[i].node_id);
  };
  Model.prototype.entity = function (key) {
    if (this.groups.has(key)) return this.groups.get(key);
    var i = this.index.get(key);
    return {key: key, i: i, name: this.view.names[i], kind: this.view.kinds[i], xy: this.xy[i]};
  };
  // Edges between what is drawn: a link as it is, or links into or out of
  // a supernode summed per pair (links inside one supernode dropped).
  Model.prototype.edges = function () {
    var m = this, out = [], pairs = new Map();
    m.links.forEach(function (l) {
      var s = m.key(l.s), t = m.key(l.t);
      if (s === t) return;
      if (m.groupOf[l.s] === null && m.groupOf[l.t] === null) {
        out.push({s: s, t: t, w: l.w, n: 1});
        return;
      }
      var k = s + '\u0000' + t, e = pairs.get(k);
      if (!e) { e = {s: s, t: t, w: 0, n: 0}; pairs.set(k, e); out.push(e); }
      e.w += l.w; e.n += 1;
    });
    return out;
  };
  Model.prototype.group = function (keys) {
    var m = this, members = [];
    keys.forEach(function (k) {
      if (m.groups.has(k)) { members = members.concat(m.groups.get(k).members); m.ungroup(k); }
      else members.push(m.index.get(k));
    });
    var id = 'group-' + m.nextGroup;
    while (m.index.has(id)) id += '\u2032';
    var name = 'Group ' + m.nextGroup++;
    members.forEach(function (i) { m.groupOf[i] = id; });
    var g = {key: id, name: name, kind: 'super', members: members};
    m.groups.set(id, g);
    m.place(g);
    return id;
  };
  // A supernode sits at the mean position of its members.
  Model.prototype.place = function (g) {
    var m = this, x = 0, y = 0;
    g.members.forEach(function (i) { x += m.xy[i][0]; y += m.xy[i][1]; });
    g.xy = [x / g.members.length, y / g.members.length];
  };
  Model.prototype.ungroup = function (key) {
    var m = this, g = m.groups.get(key);
    g.members.forEach(function (i) { m.groupOf[i] = null; });
    m.groups.delete(key);
    return g.members;
  };

  // ------------------------------------------------------------------- page
  function Page(root, model) {
    this.root = root; this.m = model;
    this.pinned = [];        // keys, most recent last
    this.hover = null;
    this.threshold = 0;
    this.build();
  }

  Page.prototype.build = function () {
    var p = this, m = this.m, meta = m.graph.metadata || {};
    var prompt = meta.prompt !== undefined ? meta.prompt : m.tokens.join('');
    this.slider = el('input', {id: 'gc-threshold', type: 'range', min: 0,
                               max: Math.max(0, m.abs.length - 1), step: 1,
                               oninput: function () { p.setThreshold(+p.slider.value); }});
    if (!m.abs.length) this.slider.disabled = true;
    this.thresholdText = el('span', {id: 'gc-threshold-text', cls: 'gc-muted'});
    this.groupBtn = el('button', {id: 'gc-group', type: 'button', text: 'Group pinned',
                                  title: 'Draw the pinned nodes as one supernode, their edges summed',
                                  onclick: function () { p.doGroup(); }});
    this.ungroupBtn = el('button', {id: 'gc-ungroup', type: 'button', text: 'Ungroup',
                                    title: 'Split the pinned supernodes back into their nodes',
                                    onclick: function () { p.doUngroup(); }});
    this.clearBtn = el('button', {id: 'gc-clear', type: 'button', text: 'Clear pins',
                                  onclick: function () { p.pinned = []; p.refresh(); }});
    var legend = el('span', {cls: 'gc-legend'}, [
      el('i', {cls: 'gc-sw gc-sw-feature'}), 'feature ', el('i', {cls: 'gc-sw gc-sw-error'}), 'error ',
      el('i', {cls: 'gc-sw gc-sw-embedding'}), 'embedding ', el('i', {cls: 'gc-sw gc-sw-logit'}), 'logit ',
      el('i', {cls: 'gc-ln gc-ln-pos'}), '+ ', el('i', {cls: 'gc-ln gc-ln-neg'}), '\u2212']);
    var facts = [m.nodes.length + ' nodes', m.links.length + ' edges'];
    if (meta.node_threshold !== undefined) facts.push('node threshold ' + fmt(meta.node_threshold));
    ['replacement_score', 'completeness_score'].forEach(function (k) {
      if (typeof meta[k] === 'number') facts.push(k.replace('_score', '') + ' ' + fmt(meta[k]));
    });
    if (meta.scan) facts.push(String(meta.scan));
    this.root.textContent = '';
    this.root.appendChild(el('header', {cls: 'gc-header'}, [
      el('h1', {text: meta.slug ? String(meta.slug) : 'Attribution graph'}),
      el('p', {cls: 'gc-prompt', text: tok(prompt)}),
      el('p', {cls: 'gc-muted', text: facts.join(' \u00b7 ')}),
      el('div', {cls: 'gc-controls'}, [
        el('label', null, ['edges |weight| \u2265 ', this.slider]), this.thresholdText,
        this.groupBtn, this.ungroupBtn, this.clearBtn, legend])]));
    this.svg = svg('svg', {id: 'gc-svg'});
    this.gBack = svg('g', {cls: 'gc-back'});
    this.gRows = svg('g', {cls: 'gc-rows'});  // row labels, kept in view
    this.gTokens = svg('g', {cls: 'gc-tokens'});  // the token axis, kept in view
    this.gEdges = svg('g', {cls: 'gc-edges', id: 'gc-edges'});
    this.gNodes = svg('g', {cls: 'gc-nodes', id: 'gc-nodes'});
    this.svg.appendChild(this.gBack); this.svg.appendChild(this.gEdges); this.svg.appendChild(this.gNodes);
    this.svg.appendChild(this.gTokens); this.svg.appendChild(this.gRows);
    this.panel = el('aside', {id: 'gc-panel', cls: 'gc-panel'});
    var box = el('div', {cls: 'gc-graph', id: 'gc-graph'}, [this.svg]);
    this.root.appendChild(el('div', {cls: 'gc-body'}, [box, this.panel]));
    this.box = box;
    this.tip = el('div', {id: 'gc-tip', cls: 'gc-tip', hidden: ''});
    document.body.appendChild(this.tip);
    this.layout();
    // Row labels follow horizontal scrolling; a wide graph opens scrolled
    // to its end, where the logits are.
    // The token axis follows vertical scrolling, so the prompt stays in
    // sight however tall the graph.
    box.addEventListener('scroll', function () {
      p.gRows.setAttribute('transform', 'translate(' + box.scrollLeft + ' 0)');
      p.stickTokens();
    });
    box.scrollLeft = box.scrollWidth;
    var start = 0;
    while (start < m.abs.length - 1 && m.abs[start] < m.view.threshold) start++;
    this.slider.value = start;
    this.setThreshold(start);
    // Lay the graph out again when the window settles at a new size (not on
    // a resize that comes back to the old one, as a full-page capture does:
    // redrawing would drop the node under the pointer mid-click).
    var resized = null, size = [this.box.clientWidth, this.box.clientHeight];
    window.addEventListener('resize', function () {
      clearTimeout(resized);
      resized = setTimeout(function () {
        var now = [p.box.clientWidth, p.box.clientHeight];
        if (now[0] === size[0] && now[1] === size[1]) return;
        size = now;
        p.layout(); p.applyThreshold(); p.refresh();
      }, 150);
    });
    this.svg.addEventListener('mouseover', function (e) { p.over(e); });
    this.svg.addEventListener('mouseout', function (e) { p.out(e); });
    this.svg.addEventListener('mousemove', function (e) { p.moveTip(e); });
    this.svg.addEventListener('click', function (e) {
      var n = e.target.closest('.gc-node');
      if (n) p.toggle(n.getAttribute('data-id'));
    });
    this.panel.addEventListener('click', function (e) {
      var a = e.target.closest('[data-goto]');
      if (a) { e.preventDefault(); p.pin(a.getAttribute('data-goto')); return; }
      var x = e.target.closest('[data-unpin]');
      if (x) p.toggle(x.getAttribute('data-unpin'));
    });
  };

  // Positions for the graph box's size, then everything drawn at them.
  Page.prototype.layout = function () {
    var m = this.m;
    m.geometry(this.box.clientWidth - 2, this.box.clientHeight - 2);
    this.svg.setAttribute('width', m.width);
    this.svg.setAttribute('height', m.height);
    this.svg.setAttribute('viewBox', '0 0 ' + m.width + ' ' + m.height);
    [this.gBack, this.gRows, this.gTokens, this.gNodes].forEach(function (g) { g.textContent = ''; });
    this.drawBack(); this.drawNodes(); this.drawGroups(); this.drawEdges();
    this.stickTokens();
  };

  Page.prototype.stickTokens = function () {
    var dy = Math.min(0, this.box.scrollTop + this.box.clientHeight - this.m.height);
    this.gTokens.setAttribute('transform', 'translate(0 ' + dy + ')');
  };

  Page.prototype.drawBack = function () {
    var m = this.m, v = m.view, g = this.gBack, rows = this.gRows;
    rows.appendChild(svg('rect', {cls: 'gc-row-back', x: 0, y: 0, width: LEFT - 6, height: m.height}));
    v.rows.forEach(function (r, i) {
      var yTop = m.height - BOTTOM - m.rowY[i] - r.lines * m.line - ROW_PAD / 2;
      var h = r.lines * m.line + ROW_PAD;
      if (i % 2 === 0) g.appendChild(svg('rect', {cls: 'gc-band', x: 0, y: yTop, width: m.width, height: h}));
      rows.appendChild(svg('text', {cls: 'gc-row-label', x: LEFT - 10, y: yTop + h / 2 + 4, text: r.label}));
    });
    var axis = this.gTokens;
    axis.appendChild(svg('rect', {cls: 'gc-token-back', x: 0, y: m.height - BOTTOM + 4,
                                  width: m.width, height: BOTTOM - 4}));
    v.columns.forEach(function (c, i) {
      var x = m.colX[i], w = c.slots * m.slot;
      if (i > 0) g.appendChild(svg('line', {cls: 'gc-col-line', x1: x - COL_PAD / 2, x2: x - COL_PAD / 2,
                                            y1: m.top - 8, y2: m.height - BOTTOM + 4}));
      var t = svg('text', {cls: 'gc-token', x: x + w / 2, y: m.height - BOTTOM + 18,
                           text: cut(c.token, Math.max(2, Math.floor((w + COL_PAD) / 7)))});
      t.appendChild(svg('title', {text: JSON.stringify(c.token) + ' (position ' + i + ')'}));
      axis.appendChild(t);
    });
  };

  function shape(kind, xy, target) {
    var x = xy[0], y = xy[1];
    if (kind === 'feature' || kind === 'other') return svg('circle', {cx: x, cy: y, r: 5.5});
    if (kind === 'error') return svg('rect', {x: x - 4.5, y: y - 4.5, width: 9, height: 9});
    return svg('rect', {x: x - 6.5, y: y - 5.5, width: 13, height: 11, rx: 2,
                        'stroke-width': target ? 2 : 1});
  }

  Page.prototype.drawNodes = function () {
    var m = this.m, g = this.gNodes, p = this;
    this.nodeEls = new Map();
    m.nodes.forEach(function (n, i) {
      var kind = m.view.kinds[i];
      var e = shape(kind, m.xy[i], n.is_target_logit);
      e.setAttribute('class', 'gc-node gc-' + kind);
      e.setAttribute('data-id', String(n.node_id));
      g.appendChild(e);
      p.nodeEls.set(String(n.node_id), e);
      if (kind === 'logit') {
        var x = m.xy[i][0], y = m.xy[i][1] - 10;
        g.appendChild(svg('text', {cls: 'gc-logit-label', x: x, y: y,
                                   transform: 'rotate(-55 ' + x + ' ' + y + ')',
                                   text: cut(m.view.names[i], 22)}));
      }
    });
  };

  Page.prototype.drawGroups = function () {
    var p = this, m = this.m;
    this.gNodes.querySelectorAll('.gc-super').forEach(function (e) { e.remove(); });
    m.nodes.forEach(function (n, i) {
      p.nodeEls.get(String(n.node_id)).classList.toggle('gc-grouped', m.groupOf[i] !== null);
    });
    m.groups.forEach(function (gr) {
      m.place(gr);
      var label = gr.name + ' (' + gr.members.length + ')';
      var w = label.length * 6.6 + 12, x = gr.xy[0], y = gr.xy[1];
      var e = svg('g', {cls: 'gc-node gc-super', 'data-id': gr.key});
      e.appendChild(svg('rect', {x: x - w / 2, y: y - 10, width: w, height: 20, rx: 5}));
      e.appendChild(svg('text', {x: x, y: y + 4, text: label}));
      p.gNodes.appendChild(e);
      p.nodeEls.set(gr.key, e);
    });
  };

  Page.prototype.drawEdges = function () {
    var m = this.m, g = this.gEdges, p = this;
    var edges = m.edges().sort(function (a, b) { return Math.abs(a.w) - Math.abs(b.w); });
    var max = m.view.max_weight || 1;
    var frag = document.createDocumentFragment();
    this.adj = new Map();
    edges.forEach(function (e) {
      var a = m.entity(e.s).xy, b = m.entity(e.t).xy;
      var sy = a[1] - 6, ty = b[1] + 6, my = (sy + ty) / 2;
      var f = Math.min(1, Math.abs(e.w) / max);
      var path = svg('path', {
        cls: 'gc-edge ' + (e.w >= 0 ? 'gc-pos' : 'gc-neg'),
        d: 'M' + a[0] + ' ' + sy + 'C' + a[0] + ' ' + my + ' ' + b[0] + ' ' + my + ' ' + b[0] + ' ' + ty,
        'stroke-width': (0.6 + 3.6 * Math.sqrt(f)).toFixed(2),
        'stroke-opacity': (0.3 + 0.6 * f).toFixed(2),
        'data-s': e.s, 'data-t': e.t, 'data-w': String(e.w)});
      e.el = path;
      frag.appendChild(path);
      [e.s, e.t].forEach(function (k) {
        if (!p.adj.has(k)) p.adj.set(k, {in: [], out: []});
      });
      p.adj.get(e.s).out.push(e); p.adj.get(e.t).in.push(e);
    });
    g.textContent = '';
    g.appendChild(frag);
    this.edgeList = edges;
  };

  Page.prototype.setThreshold = function (i) {
    var m = this.m;
    this.threshold = m.abs.length ? m.abs[Math.max(0, Math.min(i, m.abs.length - 1))] : 0;
    this.applyThreshold();
    this.renderPanel();
  };
  Page.prototype.applyThreshold = function () {
    var t = this.threshold, shown = 0;
    this.edgeList.forEach(function (e) {
      var off = Math.abs(e.w) < t;
      e.el.classList.toggle('gc-off', off);
      if (!off) shown++;
    });
    this.thresholdText.textContent = fmt(t) + ' \u00b7 ' + shown + ' of ' + this.edgeList.length + ' edges shown';
    this.thresholdText.dataset.threshold = String(t);
    this.thresholdText.dataset.shown = String(shown);
  };

  // ------------------------------------------------------------ interaction
  Page.prototype.over = function (e) {
    var n = e.target.closest('.gc-node'), edge = e.target.closest('.gc-edge');
    if (n) {
      this.hover = n.getAttribute('data-id');
      this.showTip(this.nodeTip(this.hover), e);
      this.highlight();
    } else if (edge) {
      this.showTip(this.edgeTip(edge), e);
    }
  };
  Page.prototype.out = function (e) {
    if (e.relatedTarget && e.target.closest('.gc-node') && e.relatedTarget.closest &&
        e.relatedTarget.closest('.gc-node') === e.target.closest('.gc-node')) return;
    this.tip.hidden = true;
    if (this.hover !== null) { this.hover = null; this.highlight(); }
  };
  Page.prototype.showTip = function (lines, e) {
    this.tip.textContent = '';
    var p = this;
    lines.forEach(function (l, k) {
      p.tip.appendChild(el('div', {cls: k === 0 ? 'gc-tip-head' : null, text: l}));
    });
    this.tip.hidden = false;
    this.moveTip(e);
  };
  Page.prototype.moveTip = function (e) {
    if (this.tip.hidden) return;
    var w = this.tip.offsetWidth, h = this.tip.offsetHeight;
    var x = e.clientX + 14, y = e.clientY + 14;
    if (x + w > window.innerWidth - 4) x = Math.max(4, e.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, e.clientY - h - 14);
    this.tip.style.left = x + 'px'; this.tip.style.top = y + 'px';
  };
  Page.prototype.details = function (key) {
    var m = this.m, ent = m.entity(key);
    if (ent.kind === 'super') {
      return [['members', ent.members.length + ': ' + ent.members.map(function (i) {
        return m.view.names[i]; }).join(', ')]];
    }
    var n = m.nodes[ent.i], pos = n.ctx_idx;
    var rows = [['type', n.feature_type], ['layer', String(n.layer)],
                ['position', pos + (pos < m.tokens.length ? ' ' + JSON.stringify(tok(m.tokens[pos])) : '')]];
    // An embedding's `feature` is not a latent (writers put the token id
    // or the position there); a logit's is its token id.
    if (n.feature !== null && n.feature !== undefined && ent.kind !== 'embedding') {
      rows.push([ent.kind === 'logit' ? 'token id' : 'latent', String(n.feature)]);
    }
    rows.push(['activation', fmt(n.activation)], ['influence', fmt(n.influence)]);
    if (ent.kind === 'logit') {
      rows.push(['probability', fmt(n.token_prob)]);
      if (n.is_target_logit) rows.push(['target', 'yes']);
    }
    if (n.clerp) rows.push(['label', String(n.clerp)]);
    return rows;
  };
  Page.prototype.nodeTip = function (key) {
    var ent = this.m.entity(key), a = this.adj.get(key) || {in: [], out: []};
    return [ent.name].concat(this.details(key).map(function (r) { return r[0] + ': ' + r[1]; }))
      .concat([a.in.length + ' in, ' + a.out.length + ' out' +
               (this.pinned.indexOf(key) >= 0 ? ' (pinned)' : ' \u00b7 click to pin')]);
  };
  Page.prototype.edgeTip = function (path) {
    var m = this.m, w = +path.getAttribute('data-w');
    return [m.entity(path.getAttribute('data-s')).name + ' \u2192 ' + m.entity(path.getAttribute('data-t')).name,
            'weight ' + fmt(w)];
  };
  Page.prototype.highlight = function () {
    var on = new Set(this.pinned);
    if (this.hover !== null) on.add(this.hover);
    this.svg.classList.toggle('gc-focus', on.size > 0);
    this.edgeList.forEach(function (e) {
      e.el.classList.toggle('gc-hl', on.has(e.s) || on.has(e.t));
    });
    var pinned = new Set(this.pinned);
    this.nodeEls.forEach(function (e, k) { e.classList.toggle('gc-pinned', pinned.has(k)); });
  };
  Page.prototype.toggle = function (key) {
    var at = this.pinned.indexOf(key);
    if (at >= 0) this.pinned.splice(at, 1); else this.pinned.push(key);
    this.refresh();
  };
  Page.prototype.pin = function (key) {
    if (this.pinned.indexOf(key) < 0) this.pinned.push(key);
    this.refresh();
    var e = this.nodeEls.get(key);
    if (e && e.scrollIntoView) e.scrollIntoView({block: 'nearest', inline: 'nearest'});
  };
  Page.prototype.refresh = function () {
    this.highlight();
    this.renderPanel();
    var m = this.m;
    this.groupBtn.disabled = this.pinned.length < 2;
    this.ungroupBtn.disabled = !this.pinned.some(function (k) { return m.groups.has(k); });
    this.clearBtn.disabled = this.pinned.length === 0;
  };
  Page.prototype.doGroup = function () {
    if (this.pinned.length < 2) return;
    var key = this.m.group(this.pinned);
    this.pinned = [key];
    this.redraw();
  };
  Page.prototype.doUngroup = function () {
    var m = this.m, p = this, keep = [];
    this.pinned.forEach(function (k) { if (m.groups.has(k)) m.ungroup(k); else keep.push(k); });
    this.pinned = keep;
    this.redraw();
  };
  Page.prototype.redraw = function () {
    this.drawGroups(); this.drawEdges(); this.applyThreshold(); this.refresh();
  };

  // ------------------------------------------------------------ side panel
  Page.prototype.renderPanel = function () {
    var p = this, m = this.m;
    this.panel.textContent = '';
    if (!this.pinned.length) {
      this.panel.appendChild(el('p', {cls: 'gc-note', text:
        'Hover a node or an edge for its details. Click a node to pin it: its edges are ' +
        'listed here. Pin two or more and press \u201cGroup pinned\u201d to draw them as one ' +
        'supernode with their edges summed.'}));
      this.groupBtn.disabled = true; this.ungroupBtn.disabled = true; this.clearBtn.disabled = true;
      return;
    }
    this.pinned.slice().reverse().forEach(function (key) { p.panel.appendChild(p.card(key)); });
  };
  Page.prototype.card = function (key) {
    var p = this, m = this.m, ent = m.entity(key), a = this.adj.get(key) || {in: [], out: []};
    var dl = el('dl', {cls: 'gc-details'});
    this.details(key).forEach(function (r) {
      dl.appendChild(el('dt', {text: r[0]})); dl.appendChild(el('dd', {text: r[1]}));
    });
    var href = ent.i !== undefined ? m.view.hrefs[ent.i] : null;
    return el('section', {cls: 'gc-card', 'data-id': key}, [
      el('h3', null, [el('i', {cls: 'gc-sw gc-sw-' + ent.kind}), ent.name,
                      el('button', {type: 'button', cls: 'gc-x', 'data-unpin': key, title: 'unpin', text: '\u00d7'})]),
      dl,
      href ? el('a', {cls: 'gc-dash', href: href, target: '_blank', rel: 'noopener',
                      text: 'dashboard page of latent ' + m.nodes[ent.i].feature + ' \u2197'}) : null,
      this.edgeTable('Incoming', a.in, 's', 'gc-in'),
      this.edgeTable('Outgoing', a.out, 't', 'gc-out')]);
  };
  Page.prototype.edgeTable = function (title, edges, other, cls) {
    var m = this.m, t = this.threshold;
    var rows = edges.slice().sort(function (x, y) { return Math.abs(y.w) - Math.abs(x.w); });
    var below = rows.filter(function (e) { return Math.abs(e.w) < t; }).length;
    var table = el('table', {cls: 'gc-edge-table ' + cls});
    rows.forEach(function (e) {
      table.appendChild(el('tr', {cls: 'gc-row' + (Math.abs(e.w) < t ? ' gc-below' : ''),
                                  'data-s': e.s, 'data-t': e.t, 'data-w': String(e.w)}, [
        el('td', null, [el('a', {href: '#', 'data-goto': e[other], text: m.entity(e[other]).name})]),
        el('td', {cls: 'gc-num ' + (e.w >= 0 ? 'gc-pos' : 'gc-neg'), text: fmt(e.w)})]));
    });
    return el('div', null, [
      el('h4', {text: title + ' (' + rows.length + (below ? ', ' + below + ' below the threshold' : '') + ')'}),
      rows.length ? table : el('p', {cls: 'gc-note', text: 'none'})]);
  };

  // ------------------------------------------------------------------ start
  G.start = function (root) {
    var t0 = performance.now();
    if (!G.graph || !G.view) {
      root.textContent = 'No graph in this page.';
      console.error('gemscope circuit viewer: no graph data');
      return;
    }
    G.page = new Page(root, new Model(G.graph, G.view));
    G.page.refresh();
    G.readyMs = performance.now() - t0;
    root.dataset.ready = '1';
  };
})();
